#!/bin/bash
# pervade worker job for (Son of) Grid Engine, rendered by `pervade submit --scheduler sge` (a Jinja2
# template: copy it, edit it, and pass it back with --template FILE). One job (or array task) runs one
# worker per GPU. GPU and memory resource names differ between sites: edit the -l lines to yours.
#$ -N {{ job_name }}
#$ -S /bin/bash
#$ -cwd
#$ -j y
#$ -o {{ log_dir }}
{%- if workers > 1 %}
#$ -t 1-{{ workers }}
{%- endif %}
{%- if cpus_per_job > 1 %}
#$ -pe smp {{ cpus_per_job }}
{%- endif %}
{%- if gpus_per_job %}
#$ -l gpu={{ gpus_per_job }}
{%- endif %}
{%- if memory %}
#$ -l mem_free={{ memory }}
{%- endif %}
{%- if time_limit_s %}
#$ -l h_rt={{ time_limit_s | hms }}
{%- endif %}
{%- if partition %}
#$ -q {{ partition }}
{%- endif %}
{%- if account %}
#$ -P {{ account }}
{%- endif %}
#$ -r {{ "y" if requeue else "n" }}
# -notify: SIGUSR1 before a suspension and SIGUSR2 before a kill, so the workers hand their batches back.
#$ -notify
{%- for line in extra_lines %}
{{ line }}
{%- endfor %}

set -eo pipefail
{%- for line in setup_lines %}
{{ line }}
{%- endfor %}
if [ "${SGE_TASK_ID:-undefined}" = undefined ]; then JOB="sge-$JOB_ID"; else JOB="sge-$JOB_ID.$SGE_TASK_ID"; fi
exec {{ python }} -m pervade node --broker {{ broker }} --job-id "$JOB" {{ node_args }}
