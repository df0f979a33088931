"""Build side: target resolution, the relax pipeline (fusion + schedules), library export."""
