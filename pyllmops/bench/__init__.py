"""Kernel microbenchmarks: `python -m pyllmops bench <family>`; one module per family, one harness."""

# family -> module defining run(bench: harness.Bench)
FAMILIES = {
    "nf4": "pyllmops.bench.nf4",
    "attention": "pyllmops.bench.attention",
    "paged": "pyllmops.bench.paged",
    "lora": "pyllmops.bench.lora",
    "model": "pyllmops.bench.model",  # the model-level row alone (bench lora ends with it too)
}
