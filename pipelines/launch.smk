# Per deployment: build_<name> (all runtime files of the deployment). The first rule is the default target.
rule default:
    input: PLAN.build_inputs(PLAN.default)

for name in PLAN.deployments:
    rule:
        name: f"build_{name}"
        input: PLAN.build_inputs(name)
