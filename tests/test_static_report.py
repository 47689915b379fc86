"""The static GPU report (pyllmops/bench/static.py): ptxas / PTX / SASS parsers and the occupancy rules on
literal examples with answers worked out by hand, plus small nvcc runs (skipped without nvcc)."""
import json
import shutil
import textwrap

import pytest

from pyllmops.bench import static as st

SM80 = st.limits_for("80")
SM90 = st.limits_for("90a")

# ---- occupancy: answers from the CUDA occupancy rules (cuda_occupancy.h), worked by hand ----------


def test_limits_are_the_documented_ones():
    assert st.limits_for("90a") is st.limits_for("90")
    for lim in (SM80, SM90):
        assert (lim.regs_per_sm, lim.reg_alloc_unit, lim.max_ctas_per_sm, lim.max_warps_per_sm) == (65536, 256, 32, 64)
        assert lim.smem_reserved_per_cta == 1024
    assert SM80.smem_per_sm == 164 * 1024 and SM90.smem_per_sm == 228 * 1024
    with pytest.raises(ValueError, match="no occupancy limits"):
        st.limits_for("75")


def test_occupancy_174_regs_128_threads_sm80():
    # 174 regs -> 176 allocated (x 32 lanes = 5632 per warp, a multiple of 256); a sub-partition has
    # 16384 regs -> 2 warps, x 4 sub-partitions = 8 warps per SM = 2 CTAs of 4 warps. Cross-check:
    # 65536 / (176 * 128) = 2.9 -> 2. Shared memory (1 KB reserve) and warps (64 / 4 = 16) allow more.
    occ = st.occupancy(SM80, regs=174, threads=128, smem_static=0)
    assert (occ["ctas"], occ["warps"], occ["limiter"], occ["regs_allocated"]) == (2, 8, "regs", 176)
    assert occ["by"]["smem"] == 164 and occ["by"]["warps"] == 16


def test_occupancy_warp_limit_and_tie():
    # 32 regs x 256 threads: registers allow 64 warps = 8 CTAs; the 64-warp limit gives 8 too
    occ = st.occupancy(SM90, regs=32, threads=256)
    assert (occ["ctas"], occ["warps"], occ["limiter"]) == (8, 64, "regs+warps")


def test_occupancy_cta_limit():
    # one warp per CTA, 16 regs: 64 warps fit, but at most 32 CTAs per SM
    occ = st.occupancy(SM80, regs=16, threads=32)
    assert (occ["ctas"], occ["warps"], occ["limiter"]) == (32, 32, "ctas")


def test_occupancy_sub_partitions_round_down():
    # 200 regs (6400 per warp): 16384 / 6400 = 2 warps per sub-partition -> 8 per SM, so 8 one-warp
    # CTAs, not the 65536 / 6400 = 10 a whole-SM division would give
    assert st.occupancy(SM80, regs=200, threads=32)["ctas"] == 8


def test_occupancy_shared_memory():
    # 100 KB dynamic + 1 KB reserve = 103424 B per CTA: 1 on sm_80 (164 KB), 2 on sm_90 (228 KB)
    occ80 = st.occupancy(SM80, regs=64, threads=128, smem_dynamic=100 * 1024)
    occ90 = st.occupancy(SM90, regs=64, threads=128, smem_dynamic=100 * 1024)
    assert (occ80["ctas"], occ80["limiter"], occ80["smem_per_cta"]) == (1, "smem", 103424)
    assert (occ90["ctas"], occ90["limiter"]) == (2, "smem")
    # static and dynamic add up, rounded up to 128 B: 3 x (20000 + 30000 + 1024 -> 51072) <= 164 KB < 4 x
    assert st.occupancy(SM80, regs=32, threads=128, smem_static=20000, smem_dynamic=30000)["ctas"] == 3
    # more than the 163 KB opt-in maximum per block on sm_80: does not launch; fits sm_90
    assert st.occupancy(SM80, regs=32, threads=128, smem_dynamic=164 * 1024)["ctas"] == 0
    assert st.occupancy(SM90, regs=32, threads=128, smem_dynamic=164 * 1024)["ctas"] == 1


def test_occupancy_block_register_limit_and_barriers():
    # 1024 threads x 64 regs = 65536: exactly the per-block limit, 1 CTA; 65 regs (-> 72) does not fit
    assert st.occupancy(SM80, regs=64, threads=1024)["ctas"] == 1
    assert st.occupancy(SM80, regs=65, threads=1024)["ctas"] == 0
    assert st.occupancy(SM80, regs=256, threads=32)["ctas"] == 0   # above 255 per thread
    # 16 named barriers per CTA: 64 / 16 = 4 CTAs
    occ = st.occupancy(SM90, regs=32, threads=32, barriers=16)
    assert (occ["ctas"], occ["limiter"]) == (4, "barriers")
    assert st.warps_by_registers(SM80, 174) == 8 and st.warps_by_registers(SM80, 30) == 64


# ---- parsers ----------------------------------------------------------------------------------------

PTXAS_LOG = textwrap.dedent("""\
    ptxas info    : 0 bytes gmem
    ptxas info    : Function properties for _Z6helperv
        16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Compiling entry function '_Z3fwdPf' for 'sm_80'
    ptxas info    : Function properties for _Z3fwdPf
        0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
    ptxas info    : Used 174 registers, used 1 barriers, 33280 bytes smem, 760 bytes cmem[0]
    ptxas info    : Compile time = 242.935 ms
    ptxas info    : Compiling entry function '_Z3bwdPf' for 'sm_90a'
    ptxas info    : Function properties for _Z3bwdPf
        24 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
    ptxas info    : Used 168 registers, used 1 barriers, 24 bytes cumulative stack size
    ptxas info    : Compile time = 900.1 ms
    """)


def test_parse_ptxas():
    out = st.parse_ptxas(PTXAS_LOG)
    assert set(out) == {"_Z3fwdPf", "_Z3bwdPf"}  # the device function is not a kernel
    assert out["_Z3fwdPf"] == {"arch": "sm_80", "regs": 174, "barriers": 1, "smem": 33280, "cmem0": 760,
                               "stack": 0, "spill_stores": 0, "spill_loads": 0}
    # sm_90a: ptxas prints no cmem and no smem when there is none
    assert out["_Z3bwdPf"] == {"arch": "sm_90a", "regs": 168, "barriers": 1, "smem": 0, "cmem0": 0, "stack": 24,
                               "spill_stores": 24, "spill_loads": 16}


PTX = textwrap.dedent("""\
    .extern .shared .align 16 .b8 pyllmops_dynamic_smem[];
    .visible .entry _Z1aPf(
    \t.param .u64 _Z1aPf_param_0
    )
    .maxntid 128, 1, 1
    .minnctapersm 2
    {
    \tmov.u64 %rd1, pyllmops_dynamic_smem;
    }
    .visible .entry _Z1bPf(
    \t.param .u64 _Z1bPf_param_0
    )
    .reqntid 32, 2, 1
    {
    \tret;
    }
    .visible .entry _Z1cPf(
    \t.param .u64 _Z1cPf_param_0
    )
    {
    \tret;
    }
    """)


def test_parse_ptx():
    out = st.parse_ptx(PTX)
    assert out["_Z1aPf"] == {"maxntid": 128, "reqntid": None, "minnctapersm": 2, "dynamic_smem": True}
    assert out["_Z1bPf"] == {"maxntid": None, "reqntid": 64, "minnctapersm": None, "dynamic_smem": False}
    assert out["_Z1cPf"]["maxntid"] is None and not out["_Z1cPf"]["dynamic_smem"]


SASS = textwrap.dedent("""\
    \tcode for sm_80
    \t\tFunction : _Z1aPf
    \t.headerflags\t@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
            /*0000*/                   IMAD.MOV.U32 R1, RZ, RZ, c[0x0][0x28] ;                     /* 0x00000a00ff017624 */
                                                                                                   /* 0x000fc400078e00ff */
            /*0010*/                   LDG.E.128 R4, [R2.64] ;
            /*0020*/              @!P0 LDG.E.128.CONSTANT R8, [R2.64+0x10] ;
            /*0030*/                   LDG.E R12, [R2.64] ;
            /*0040*/                   LDGSTS.E.BYPASS.128 [R0], [R2.64] ;
            /*0050*/                   LDSM.16.M88.4 R16, [R0] ;
            /*0060*/                   HMMA.16816.F32.BF16 R20, R16, R18, R20 ;
            /*0070*/                   STL [R1], R20 ;
            /*0080*/                   LDL R21, [R1] ;
            /*0090*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
            /*00a0*/                   EXIT ;
            /*00b0*/                   BRA 0xb0;
            /*00c0*/                   NOP;
    \t\t..........
    \t\tFunction : _Z1bPf
            /*0000*/                   EXIT ;
    """)


def test_parse_sass():
    out = st.parse_sass(SASS)
    a = out["_Z1aPf"]
    assert (a["LDG128"], a["LDG"], a["LDGSTS"], a["LDSM"], a["HMMA"]) == (2, 3, 1, 1, 1)
    assert (a["LDL"], a["STL"], a["BAR"], a["HGMMA"]) == (1, 1, 1, 0)
    assert a["total"] == 12  # NOP padding not counted
    assert out["_Z1bPf"]["total"] == 1


def test_parse_res_usage():
    text = (" Function _Z1aPf:\n  REG:246 STACK:0 SHARED:1024 LOCAL:0 CONSTANT[0]:936 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert st.parse_res_usage(text) == {"_Z1aPf": {"REG": 246, "STACK": 0, "SHARED": 1024, "LOCAL": 0}}


def test_kernel_names():
    d = ("void pyllmops::attention::cuda::(anonymous namespace)::dkdv_kernel<__half, 64, true, false>"
         "(pyllmops::attention::Params)")
    assert st.split_kernel_name(d) == ("pyllmops::attention::cuda::(anonymous namespace)", "dkdv_kernel",
                                       ["__half", "64", "true", "false"])
    assert st.short_name(d) == "dkdv_kernel<f16,64,T,F>"
    e = ("void pyllmops::lora::(anonymous namespace)::fused_kernel<(pyllmops::lora::WeightKind)1, __nv_bfloat16>"
         "(pyllmops::lora::FusedArgs, pyllmops::lora::Weight)")
    assert st.short_name(e) == "fused_kernel<WeightKind1,bf16>"
    f = "pyllmops::nf4::(anonymous namespace)::quantize_sorted_code_kernel(float const*, long, float const*, int)"
    assert st.split_kernel_name(f) == ("pyllmops::nf4::(anonymous namespace)", "quantize_sorted_code_kernel", [])
    if shutil.which("c++filt") or shutil.which("cu++filt"):
        assert st.demangle(["_Z3fwdPf"]) == {"_Z3fwdPf": "fwd(float*)"}


def test_error_excerpt_and_spill_check():
    log = "note\nx.cu(3): error: identifier \"y\" is undefined\n  y = 1;\n  ^\n\n1 error detected\n"
    ex = st.error_excerpt(log)
    assert ex[0] == 'x.cu(3): error: identifier "y" is undefined' and "1 error detected" in ex
    recs = [{"hot": True, "spill_stores": 0, "spill_loads": 0}, {"hot": True, "spill_stores": 0, "spill_loads": 8},
            {"hot": False, "spill_stores": 8, "spill_loads": 8}]
    assert st.spilling(recs) == [recs[1]]


# ---- nvcc ---------------------------------------------------------------------------------------------

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")

SMALL_CU = textwrap.dedent("""\
    template <int kD> struct Cfg { static constexpr int kSmem = (64 + kD) * 8; };
    template <typename T, int kD>
    __global__ void __launch_bounds__(128) scale_kernel(T* x, int n) {
      extern __shared__ __align__(16) unsigned char smem[];
      T* s = reinterpret_cast<T*>(smem);
      int i = blockIdx.x * blockDim.x + threadIdx.x;
      if (i < n) { s[threadIdx.x] = x[i] * T(2); __syncthreads(); x[i] = s[127 - threadIdx.x]; }
    }
    __global__ void plain_kernel(float* x) { x[threadIdx.x] += 1.0f; }
    void launch(float* x, int n) {
      scale_kernel<float, 32><<<1, 128, Cfg<32>::kSmem>>>(x, n);
      plain_kernel<<<1, 32>>>(x);
    }
    """)


@needs_nvcc
def test_compile_one_small_kernel(tmp_path):
    src = tmp_path / "small.cu"
    src.write_text(SMALL_CU)
    r = st.compile_one(src, "80", tmp_path / "work", tmp_path)
    assert r["ok"], r["error"]
    names = st.demangle(list(r["ptxas"]))
    by_base = {st.split_kernel_name(names[m])[1]: m for m in r["ptxas"]}
    assert set(by_base) == {"scale_kernel", "plain_kernel"}
    m = by_base["scale_kernel"]
    assert r["ptxas"][m]["regs"] > 0 and r["ptxas"][m]["arch"] == "sm_80"
    assert r["ptx"][m]["maxntid"] == 128 and r["ptx"][m]["dynamic_smem"]
    assert r["ptx"][by_base["plain_kernel"]] == {"maxntid": None, "reqntid": None, "minnctapersm": None,
                                                  "dynamic_smem": False}
    # the launcher's expression, evaluated by the compiler; one that does not compile gives None
    qual = st.split_kernel_name(names[m])[0]
    vals = st.probe_dynamic_smem(src, [("a", qual, "Cfg<32>::kSmem"), ("b", qual, "Cfg<32>::kNope")], tmp_path,
                                 tmp_path)
    assert vals == {"a": (64 + 32) * 8, "b": None}


@needs_nvcc
def test_run_reports_a_file_that_fails_and_goes_on(tmp_path, capsys):
    root = tmp_path / "repo"
    (root / "csrc" / "good").mkdir(parents=True)
    (root / "csrc" / "bad").mkdir(parents=True)
    (root / "csrc" / "emu").mkdir(parents=True)
    (root / "csrc" / "good" / "good.cu").write_text(SMALL_CU)
    (root / "csrc" / "bad" / "bad.cu").write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    (root / "csrc" / "emu" / "not_for_nvcc.cu").write_text("#error the emulator's sources are not compiled\n")
    out = tmp_path / "out"
    rc = st.run(root, out, ["80"], jobs=2, check=True, sass=False)
    assert rc == 1  # the bad file
    rep = json.loads((out / "static_report.json").read_text())
    assert [f["file"] for f in rep["failures"]] == ["csrc/bad/bad.cu"]
    assert any("undefined_name" in ln for ln in rep["failures"][0]["error"])
    recs = {r["kernel"]: r for r in rep["records"]}
    assert set(recs) == {"scale_kernel<f32,32>", "plain_kernel"}
    k = recs["scale_kernel<f32,32>"]
    assert k["threads"] == 128 and k["regs"] > 0 and k["smem_dynamic"] is None  # not in DYNAMIC_SMEM
    assert k["ctas_per_sm"] >= 1 and "static smem only" in k["occupancy_note"]
    assert recs["plain_kernel"]["ctas_per_sm"] is None and recs["plain_kernel"]["warps_per_sm_max_by_regs"] == 64
    md = (out / "static_report.md").read_text()
    assert md.startswith("These are static numbers") and "csrc/bad/bad.cu" in md
    assert "FAILED to compile" in capsys.readouterr().err


@pytest.mark.skipif(shutil.which("git") is None, reason="git not on PATH")
def test_export_ref_takes_the_committed_sources(tmp_path):
    import subprocess

    repo = tmp_path / "repo"
    (repo / "csrc" / "fam").mkdir(parents=True)
    (repo / "csrc" / "fam" / "a.cu").write_text("// committed\n")
    (repo / "CMakeLists.txt").write_text("set(PYLLMOPS_FAMILIES fam)\n")
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(git[:3] + ["init", "-q"], check=True)
    subprocess.run(git + ["add", "."], check=True)
    subprocess.run(git + ["commit", "-qm", "c"], check=True)
    (repo / "csrc" / "fam" / "a.cu").write_text("// being edited\n")
    dest = tmp_path / "dest"
    dest.mkdir()
    sha = st.export_ref(repo, "HEAD", dest)
    assert len(sha) == 40 and (dest / "csrc" / "fam" / "a.cu").read_text() == "// committed\n"
    assert st.cuda_sources(dest) == [dest / "csrc" / "fam" / "a.cu"]
    with pytest.raises(ValueError, match="not a commit"):
        st.export_ref(repo, "no-such-ref", dest)


def test_records_name_the_file_when_two_files_share_a_kernel_name(monkeypatch, tmp_path):
    ptxas = {"arch": "sm_80", "regs": 38, "barriers": 0, "smem": 0, "cmem0": 0, "stack": 0, "spill_stores": 0,
             "spill_loads": 0}
    results = [{"ok": True, "file": str(tmp_path / "csrc" / "fam" / f"{f}.cu"), "arch": "80",
                "ptxas": {f"_Z{f}": dict(ptxas)}, "ptx": {}, "sass": None, "res_usage": None, "sass_error": "none"}
               for f in ("a", "b")]
    monkeypatch.setattr(st, "demangle", lambda names: {n: "void ns::(anonymous namespace)::k<float>(int)"
                                                       for n in names})
    recs = st.build_records(results, {}, tmp_path)
    assert [r["kernel"] for r in recs] == ["k<f32> [a.cu]", "k<f32> [b.cu]"]
    # no __launch_bounds__: no CTA count, warps bound by registers (38 -> 40 per thread: 12 warps per
    # sub-partition, 48 per SM)
    assert recs[0]["ctas_per_sm"] is None and recs[0]["warps_per_sm_max_by_regs"] == 48


SPILL_CU = textwrap.dedent("""\
    // 48 live floats under a 32-register cap (1024 threads, 2 CTAs per SM): ptxas must spill
    __global__ void __launch_bounds__(1024, 2) spill_kernel(float* x) {
      float a[48];
    #pragma unroll
      for (int i = 0; i < 48; ++i) a[i] = x[i * 1024 + threadIdx.x];
      float s = 0.0f;
    #pragma unroll
      for (int i = 0; i < 48; ++i) s += a[i] * a[47 - i];
    #pragma unroll
      for (int i = 0; i < 48; ++i) x[i * 1024 + threadIdx.x] = a[i] * s;
    }
    """)


@needs_nvcc
def test_check_fails_on_a_spilling_hot_kernel_unless_allowed(tmp_path, capsys, monkeypatch):
    root = tmp_path / "repo"
    (root / "csrc" / "fam").mkdir(parents=True)
    (root / "csrc" / "fam" / "spill.cu").write_text(SPILL_CU)
    assert st.run(root, tmp_path / "o1", ["80"], jobs=1, check=True, sass=False) == 1
    err = capsys.readouterr().err
    assert "check FAILED" in err and "spill_kernel" in err
    rec = json.loads((tmp_path / "o1" / "static_report.json").read_text())["records"][0]
    assert rec["spill_stores"] > 0 and rec["regs"] <= 32 and rec["min_ctas_per_sm"] == 2 and rec["hot"]
    assert "Hot kernels that spill" in (tmp_path / "o1" / "static_report.md").read_text()
    # without --check the report is written and the exit status is 0
    assert st.run(root, tmp_path / "o2", ["80"], jobs=1, check=False, sass=False) == 0
    monkeypatch.setitem(st.SPILL_ALLOWED, "fam/spill_kernel", "test: allowed to spill")
    assert st.run(root, tmp_path / "o3", ["80"], jobs=1, check=True, sass=False) == 0
