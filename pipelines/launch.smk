# Per deployment: build_<name> (all runtime files of the deployment), serve_<name> (REST server) and chat_<name>
# (terminal chat). A launch rule needs every runtime file, so whatever is missing or stale is rebuilt first; its own
# job only checks the launch command. Once the workflow succeeds, `onsuccess` replaces the Snakemake process with the
# server / chat (exec): Ctrl-C and SIGTERM reach it directly, stdin is the terminal's, and no process is left behind.
# The first rule is the default target.
import os
import shlex
import sys

rule default:
    input: PLAN.build_inputs(PLAN.default)

# every deployment of deployments.yaml's build_all list (or --config build_all=a,b), e.g. on a cluster:
#   snakemake build_all --profile profiles/slurm
rule build_all:
    input: PLAN.build_all_inputs()

for name in PLAN.deployments:
    rule:
        name: f"build_{name}"
        input: PLAN.build_inputs(name)

    for kind in ("serve", "chat"):
        rule:
            name: f"{kind}_{name}"
            input: PLAN.runtime_inputs(name)
            params: cmd=PLAN.launch_cmd(name, kind)
            localrule: True
            shell: "echo launching: {params.cmd:q}"


onsuccess:
    launch = PLAN.launch_target(workflow.dag_settings.targets)
    if launch is not None:
        argv = shlex.split(PLAN.launch_cmd(*launch))
        workflow.persistence.unlock()  # exec skips Snakemake's own unlock; a later run must not find a stale lock
        sys.stdout.flush()
        sys.stderr.flush()
        os.execvp(argv[0], argv)
