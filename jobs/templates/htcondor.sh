#!/bin/bash
# The script each pervade HTCondor job runs ($1: htcondor-CLUSTER.PROCESS). HTCondor sets
# CUDA_VISIBLE_DEVICES to the job's GPUs and _CONDOR_SCRATCH_DIR to its scratch directory.
set -eo pipefail
{%- for line in setup_lines %}
{{ line }}
{%- endfor %}
exec {{ python }} -m pervade node --broker {{ broker }} --job-id "$1" {{ node_args }}
