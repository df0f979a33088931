"""The build steps: gen_config -> convert_weight -> compile. Each is a CLI command and a pipeline rule."""
