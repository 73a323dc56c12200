"""User input: templates and claims files, good and bad. Every bad input gets a clear error."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pervade.context import ContextSpec
from pervade.errors import ClaimsError, TemplateError
from pervade.producer.claims import ClaimFields, ClaimsSource, read_claims, sample_claims_path, scan_claims
from pervade.producer.sweep import batch_id_for, job_id_for, work_key
from pervade.producer.templates import load_templates, validate_templates
from tests.conftest import FEVER_DEV


def write_jsonl(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_the_shipped_templates_are_a_prompt_for_fact_sweep() -> None:
    """At least 8 templates: plain and chat, the labels' names and other answer words, with and without
    calibration, zero- and few-shot."""
    templates = list(load_templates().values())
    assert len(templates) >= 8
    assert all(t.text.count("{claim}") == 1 for t in templates)
    assert {t.chat for t in templates} == {True, False} and {t.calibrate for t in templates} == {True, False}
    answer_words = {a.strip() for t in templates for a in t.answers if a is not None}
    assert {"SUPPORTS", "REFUTES", "NOT ENOUGH INFO"} < answer_words and len(answer_words) >= 7
    assert any(t.text.count("Claim:") >= 3 for t in templates) and any(t.text.count("Claim:") <= 1 for t in templates)


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "no templates"),
        ('{"a": "no placeholder"}', "exactly once, found 0"),
        ('{"a": "{claim} and {claim}"}', "exactly once, found 2"),
        ('{"a": 5}', "template 'a' must be a text or an object"),
        ('{"": "{claim}"}', "non-empty strings"),
        ('{"a": {"chat": true}}', "template 'a': field 'text' is missing"),
        ('{"a": {"text": "{claim}", "labels": {"SUPPORTS": " yes"}}}', "'a', field 'labels': needs at least two"),
        ('{"a": {"text": "{claim}", "labels": {"TRUE": " yes", "REFUTES": " no"}}}', "'TRUE' is not a FEVER label"),
        ('{"a": {"text": "{claim}", "labels": {"SUPPORTS": " ", "REFUTES": " no"}}}', "SUPPORTS must be a non-empty"),
        ('{"a": {"text": "{claim}", "labels": {"SUPPORTS": "x", "REFUTES": "x"}}}', "the same answer text"),
        ('{"a": {"text": "{claim}", "labels": ["yes", "no"]}}', "'labels': expected an object"),
        ('{"a": {"text": "{claim}", "chat": "yes"}}', "field 'chat': expected true or false"),
        ('{"a": {"text": "{claim}", "calibrate": 1}}', "field 'calibrate': expected true or false"),
        ('{"a": {"text": "{claim}", "system": "Be brief."}}', "field 'system': a system message needs"),
        ('{"a": {"text": "{claim}", "chat": true, "system": "{claim}"}}', "the claim goes in 'text'"),
        ('{"a": {"text": "{claim}", "answers": {}}}', "unknown field 'answers'"),
        ('{"a": {"text": 3}}', "field 'text': expected a string"),
        ('{"a": {"text": "{claim}", "chat": true, "system": " "}}', "field 'system': an empty system message"),
    ],
)
def test_bad_templates_are_refused(tmp_path, content: str, reason: str) -> None:
    path = tmp_path / "templates.json"
    path.write_text(content)
    with pytest.raises(TemplateError, match=reason):
        load_templates(path)


def test_missing_templates_file(tmp_path) -> None:
    with pytest.raises(TemplateError, match="cannot read templates file"):
        load_templates(tmp_path / "absent.json")
    with pytest.raises(TemplateError, match="template id"):
        validate_templates({"x" * 100: "{claim}"})


def test_shipped_sample_has_all_three_labels() -> None:
    claims = list(read_claims(ClaimsSource(str(sample_claims_path()))))
    assert len(claims) == 60
    assert {c.gold_label for c in claims} == {"SUPPORTS", "REFUTES", "NOT ENOUGH INFO"}
    assert {c.gold_label for c in claims[:3]} == {"SUPPORTS", "REFUTES", "NOT ENOUGH INFO"}


@pytest.mark.skipif(not FEVER_DEV.exists(), reason="the FEVER sample lives in ../shared on the project's machines")
def test_real_fever_file_reads_with_default_fields() -> None:
    claims = list(read_claims(ClaimsSource(str(FEVER_DEV))))
    assert len(claims) == 9999
    assert claims[0].claim_id == "91198" and claims[0].gold_label == "NOT ENOUGH INFO"
    assert claims[0].text.startswith("Colin Kaepernick")


def test_limit_and_field_mapping_over_csv_and_parquet(tmp_path) -> None:
    table = pa.table({"uid": ["a", "b", "c"], "text": ["x is y", "y is z", "z is x"], "gold": ["SUPPORTS", None, "REFUTES"]})
    pq.write_table(table, tmp_path / "claims.parquet")
    table.to_pandas().to_csv(tmp_path / "claims.csv", index=False)
    fields = ClaimFields(id="uid", claim="text", label="gold")
    for name in ("claims.parquet", "claims.csv"):
        claims = list(read_claims(ClaimsSource(str(tmp_path / name), fields=fields, limit=2)))
        assert [(c.claim_id, c.text, c.gold_label) for c in claims] == [("a", "x is y", "SUPPORTS"), ("b", "y is z", None)]
    unlabelled = list(read_claims(ClaimsSource(str(tmp_path / "claims.parquet"), fields=ClaimFields("uid", "text", None))))
    assert all(c.gold_label is None for c in unlabelled)


def test_invalid_records_fail_by_default_and_can_be_skipped(tmp_path) -> None:
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"id": 1, "claim": "fine"}, {"id": 2, "claim": ""}, {"id": 3, "claim": None}, {"claim": "no id"},
        {"id": 5, "claim": "also fine"}, {"id": 6, "claim": ["not", "a", "string"]}, {"id": 1, "claim": "id reused"},
    ])  # fmt: skip
    with pytest.raises(ClaimsError, match="record 2: field 'claim' must be a non-empty string"):
        list(read_claims(ClaimsSource(path)))
    source = ClaimsSource(path, skip_invalid=True)
    assert [c.claim_id for c in read_claims(source)] == ["1", "5"]
    assert source.skipped == 5


def test_a_repeated_claim_id_is_refused(tmp_path) -> None:
    """Rows are keyed by claim id: two claims with one id would break exactly-once output."""
    path = write_jsonl(tmp_path / "c.jsonl", [{"id": 7, "claim": "first"}, {"id": "7", "claim": "second"}])
    with pytest.raises(ClaimsError, match="record 2: id '7' was already used by an earlier record"):
        list(read_claims(ClaimsSource(path)))


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.jsonl", "", "the file is empty"),
        ("notes.txt", "hello", "expected a .jsonl, .json, .csv or .parquet file"),
        ("broken.jsonl", '{"id": 1, "claim": "ok"}\n{"id": 2, "claim": \n', r"record 2 \(line 2\) is not valid JSON: Expecting value at column 20"),
        ("nothing.jsonl", json.dumps({"id": 1, "other": "x"}) + "\n", "field 'claim'"),
        ("numbers.jsonl", json.dumps({"id": 1, "claim": 12345}) + "\n", "field 'claim' must be a non-empty string"),
        ("binary.parquet", "PAR1 this is not parquet", "cannot"),
    ],
)
def test_unreadable_claims_files(tmp_path, name: str, content: str, reason: str) -> None:
    (tmp_path / name).write_text(content)
    with pytest.raises(ClaimsError, match=reason):
        list(read_claims(ClaimsSource(str(tmp_path / name))))


def test_missing_file_is_not_mistaken_for_a_hub_name(tmp_path) -> None:
    with pytest.raises(ClaimsError, match="no such file"):
        list(read_claims(ClaimsSource(str(tmp_path / "absent.jsonl"))))


def test_a_templates_file_not_in_utf8_or_with_a_repeated_id_is_refused(tmp_path) -> None:
    latin = tmp_path / "latin.json"
    latin.write_bytes('{\n"fr": "Vérifiez : {claim}"\n}'.encode("latin-1"))
    with pytest.raises(TemplateError, match=r"latin.json: not UTF-8 text \(byte 0xe9 on line 2\); save the file as UTF-8"):
        load_templates(latin)
    repeated = tmp_path / "repeated.json"
    repeated.write_text('{"a": "{claim} one", "b": "{claim} two", "a": "{claim} three"}')
    with pytest.raises(TemplateError, match="repeated.json: 'a' appears more than once in one JSON object"):
        load_templates(repeated)
    repeated.write_text('{"a": {"text": "{claim}", "labels": {"SUPPORTS": " y", "SUPPORTS": " n"}}}')
    with pytest.raises(TemplateError, match="'SUPPORTS' appears more than once .* or label of one template"):
        load_templates(repeated)


def test_a_bad_line_deep_in_a_file_is_named_by_its_number(tmp_path) -> None:
    lines = [json.dumps({"id": i, "claim": f"claim {i}"}) for i in range(1, 2001)]
    lines[1499] = '{"id": 1500, "claim": "cut short'
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(ClaimsError, match=r"c.jsonl: record 1500 \(line 1500\) is not valid JSON"):
        list(read_claims(ClaimsSource(str(tmp_path / "c.jsonl"))))


def test_a_scan_reads_the_whole_file_before_anything_is_sent(tmp_path) -> None:
    """A repeated id at record 1,801 fails the scan, which runs before the first batch is sent."""
    records = [{"id": i, "claim": f"claim {i}"} for i in range(1, 2001)]
    records[1800]["id"] = 17
    path = write_jsonl(tmp_path / "c.jsonl", records)
    with pytest.raises(ClaimsError, match="record 1801: id '17' was already used"):
        scan_claims(ClaimsSource(path), chunk_size=32)
    scan = scan_claims(ClaimsSource(path, skip_invalid=True), chunk_size=32)
    assert (scan.claims, scan.skipped, len(scan.chunk_digests)) == (1999, 1, 63)


def test_the_job_id_names_what_the_sweep_computes(tmp_path) -> None:
    """The same content is the same job wherever the file is; another claim, label, template, model or
    batch size is another job (an edited file used to keep its old job id, and its new claims were lost)."""
    records = [{"id": i, "claim": f"claim {i}", "label": "SUPPORTS"} for i in range(100)]
    context, templates = ContextSpec(model="m"), {"t": "{claim} Answer:"}

    def job_id(recs, name="c.jsonl", templates=templates, context=context, batch_size=32) -> str:
        scan = scan_claims(ClaimsSource(write_jsonl(tmp_path / name, recs)), batch_size)
        return job_id_for(context, validate_templates(templates), scan.digest, batch_size)

    first = job_id(records)
    assert job_id(records, name="elsewhere.jsonl") == first
    assert job_id(records + [{"id": 100, "claim": "appended"}]) != first
    assert job_id([{**records[0], "label": "REFUTES"}, *records[1:]]) != first
    assert job_id(records, templates={"t": "{claim} Verdict:"}) != first
    assert job_id(records, templates={"t": {"text": "{claim} Answer:", "calibrate": True}}) != first
    assert job_id(records, templates={"t": {"text": "{claim} Answer:", "labels": {"SUPPORTS": " y", "REFUTES": " n"}}}) != first
    assert job_id(records, context=ContextSpec(model="other")) != first
    assert job_id(records, batch_size=16) != first


def test_a_batch_id_is_what_earlier_producers_named_it() -> None:
    """A batch id names its claims and what they are scored with; a sweep resumed by a newer producer must
    name its batches as the older one did, or the broker and the sinks would not recognise them."""
    template = validate_templates({"t": "{claim} Answer:"})["t"]
    work = work_key(template, ContextSpec(model="m"))
    assert batch_id_for("job-x", 3, "t", b"\x01abc", work) == "job-x/0000003/t/e7bd29a4"
    assert batch_id_for("job-x", 3, "t", b"\x01abd", work) != "job-x/0000003/t/e7bd29a4"
