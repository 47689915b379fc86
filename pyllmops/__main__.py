"""python -m pyllmops {demo, info, bench FAMILY, plan}"""
import argparse
import importlib
import sys


def cmd_info(args):
    import torch

    import pyllmops

    b = pyllmops.build_info()
    print(f"pyllmops {pyllmops.__version__}")
    if b.get("emulated"):
        print("  backends compiled: emulated CUDA (CPU tensors run the CUDA kernels on the CPU emulator; "
              "docs/emulator.md)")
        print(f"  CUDA headers {b['cuda_version']}")
    else:
        print(f"  backends compiled: cpu{', cuda' if b['cuda'] else ''}")
    if b["cuda"] and not b.get("emulated"):
        print(f"  CUDA {b['cuda_version']}, archs {b['cuda_archs']}")
    print(f"  CPU threads: {pyllmops._ext.lib().num_threads()}")
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    print(f"GPUs visible to torch: {n}")
    archs = {a.rstrip("a") for a in b["cuda_archs"].split(",") if a}
    for i in range(n):
        major, minor = torch.cuda.get_device_capability(i)
        cap = f"{major}{minor}"
        covered = b["cuda"] and any(int(a) <= int(cap) for a in archs)
        print(f"  cuda:{i} {torch.cuda.get_device_name(i)} sm_{cap}"
              f"{'' if covered else '  (no kernels compiled for this arch)'}")


def cmd_bench(args):
    if args.family == "static":  # ptxas / SASS report: needs nvcc, not torch or a GPU
        from pyllmops.bench import static

        sys.exit(static.main(args))
    import torch

    from pyllmops.bench import FAMILIES
    from pyllmops.bench.harness import DEFAULT_OUT, Bench, device_slug

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    # "all": the model row runs once, at the end of lora's (the "model" family is that row alone)
    families = [f for f in FAMILIES if f != "model"] if args.family == "all" else [args.family]
    for family in families:
        if family not in FAMILIES:
            sys.exit(f"unknown benchmark family {family!r}; choose from {sorted(FAMILIES)} or 'all'")
        bench = Bench(family, device, quick=args.quick)
        importlib.import_module(FAMILIES[family]).run(bench)
        print(bench.markdown())
        root = args.out or DEFAULT_OUT
        out = bench.write(root if args.flat else f"{root}/{device_slug(bench.device)}")
        print(f"wrote {out}/{family}.json and {family}.md")


def cmd_demo(args):
    from pyllmops import demo

    demo.main(args)


def cmd_plan(args):
    from pyllmops import plan

    plan.main(args)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m pyllmops")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="QLoRA SFT, DPO and paged generation on a tiny built-in model, with a report")
    d.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    d.add_argument("--sft-steps", type=int, default=200)
    d.add_argument("--dpo-steps", type=int, default=60)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--threads", type=int, default=None, help="torch CPU threads (default 1: the model is tiny)")
    d.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    d.add_argument("--fsdp", action="store_true",
                   help="a 2-process FSDP2 QLoRA run on the CPU (torchrun, gloo) instead")
    d.set_defaults(fn=cmd_demo)
    pl = sub.add_parser("plan", help="per-rank peak memory of a (Q)LoRA fine-tuning step, and whether it fits")
    from pyllmops.plan import add_arguments as add_plan_arguments

    add_plan_arguments(pl)
    pl.set_defaults(fn=cmd_plan)
    sub.add_parser("info", help="version, compiled backends, CUDA archs, visible GPUs").set_defaults(fn=cmd_info)
    b = sub.add_parser("bench", help="kernel microbenchmarks")
    b.add_argument("family", help="op family (e.g. nf4), 'all', or 'static' (ptxas/SASS report, no GPU)")
    b.add_argument("--quick", action="store_true", help="fewer, smaller cases")
    b.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    b.add_argument("--out", default=None, help="results folder: <out>/<device>/<family>.json and .md (default ./bench-results)")
    b.add_argument("--flat", action="store_true", help="write straight into --out, without the device folder")
    from pyllmops.bench.static import add_arguments as add_static_arguments

    add_static_arguments(b.add_argument_group("static (bench static only; --out: default benchmarks/results/static)"))
    b.set_defaults(fn=cmd_bench)
    args = p.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
