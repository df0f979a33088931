# The build pipeline: configs/ -> gen_config -> convert_weight -> compile -> artifacts/, one target per deployment.
#   snakemake build_smollm2_cpu --cores 2
#   snakemake build_smollm2_cpu --cores 2 --config deployment=smollm2_cpu 'overrides=[quantization=q0f32]'
# The rules only call the `mlc_llm` CLI; the plan (what to build, with which command) is mlc_llm/pipeline.py.
import os
import sys

sys.path.insert(0, workflow.basedir)  # the repository's mlc_llm, installed or not
# Steps run `python -m mlc_llm`: make that the interpreter running Snakemake, and let it find the package.
os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
os.environ["PYTHONPATH"] = workflow.basedir + os.pathsep + os.environ.get("PYTHONPATH", "")

from mlc_llm.pipeline import make_plan

PLAN = make_plan(config)

include: "pipelines/launch.smk"
include: "pipelines/build.smk"
