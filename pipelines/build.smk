# Cached artifacts: one gen_config + convert_weight per model folder, one compile per library.
# Resources are what a cluster executor (profiles/) asks its scheduler for; a local run only counts threads. Converting
# is memory-bound, compiling CPU-bound; a GPU target's library compiles on a CPU node (no GPU is asked for).
# A source model is a local() input: with a storage provider (profiles/kubernetes) it is read where it is installed
# (the jobs' image has the same model packages), while the artifacts go through the storage.
for art in PLAN.models.values():
    rule:
        name: f"gen_config_{art.key}"
        input: lambda wc, a=art: [local(p) for p in a.source_inputs()]
        output: art.chat_config
        params: cmd=art.gen_config_cmd, code=PLAN.code["gen_config"]
        resources: mem_mb=2048, runtime=10
        shell: "{params.cmd}"

    rule:
        name: f"convert_weight_{art.key}"
        input: lambda wc, a=art: [local(p) for p in a.source_inputs()]
        output: art.tensor_cache, art.shard_files()
        params: cmd=art.convert_cmd, code=PLAN.code["convert_weight"]
        resources: mem_mb=art.convert_mem_mb(), runtime=60
        shell: "{params.cmd}"

def compile_threads():
    """A compile job's threads: compile_threads of the config, else all of --cores (a cluster run has no --cores)."""
    from snakemake.exceptions import WorkflowError

    if PLAN.compile_threads:
        return PLAN.compile_threads
    try:
        return workflow.cores
    except WorkflowError:
        raise WorkflowError("compile jobs take their threads from --cores N or from compile_threads=N in the config; "
                            "a --config on the command line replaces the profile's config, so repeat compile_threads "
                            "there") from None


# compile reads mlc-chat-config.json only for ordering (ancient): a changed chat template must not recompile.
# What the library does depend on is written to a stamp by a rule with no upstream, so its param check always
# runs (Snakemake skips param checks of jobs downstream of a job that reruns) and a change there recompiles.
for lib in PLAN.libs.values():
    rule:
        name: f"compile_inputs_{lib.key}"
        output: lib.stamp
        params: cmd=lib.compile_cmd, inputs=lib.compile_inputs, code=PLAN.code["compile"]
        localrule: True
        shell: "printf '%s\\n' {params.cmd:q} {params.inputs:q} {params.code:q} > {output:q}"

    rule:
        name: f"compile_{lib.key}"
        input: ancient(lib.model.chat_config), lib.stamp
        output: lib.path
        params: cmd=lib.compile_cmd
        threads: compile_threads()
        resources: mem_mb=8192, runtime=60
        shell: "TVM_NUM_THREADS={threads} {params.cmd}"
