"""CI build checks of the compiled kernels (no GPU needed): SASS of deepseek_ops/_C*.so.

Every kernel is compiled for sm_90a, uses no local memory (no spills, stack frame 0) and contains
the instructions its design depends on. A new kernel family adds one SASS_REQUIREMENTS entry:
{substring of its kernel's (mangled) name: [regexes its SASS must contain]}, e.g.
"sm90_fp8_gemm_kernel": [r"QGMMA\\.", r"UTMALDG"]. Spellings: dump the SASS with
`cuobjdump --dump-sass deepseek_ops/_C*.so` (cuobjdump_path() below says where one is).
"""
import functools
import importlib.util
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import pytest

import deepseek_ops

LDG_128 = r"LDG\.E[.\w]*\.128"  # 16-byte global load (LDG.E.128, LDG.E.NA.128.CONSTANT, ...)
STG_128 = r"STG\.E[.\w]*\.128"

SASS_REQUIREMENTS: Dict[str, List[str]] = {
    "sm90_per_token_group_quant_fp8_kernel": [LDG_128],
    "sm90_per_block_quant_fp8_kernel": [LDG_128],
    "sm90_dequant_fp8_block_kernel": [LDG_128, STG_128],
    # Transposes: 16-byte output rows (transpose_quant_fp8 loads 16-byte vectors where its rows are whole
    # vectors, template <T, kVec16 = true>); the e4m3 transpose swaps bytes in registers (PRMT).
    "sm90_transpose_quant_fp8_kernel": [STG_128],
    "sm90_transpose_quant_fp8_kernelI13__nv_bfloat16Lb1E": [LDG_128, r"STS\.128"],
    "sm90_transpose_fp8_kernel": [LDG_128, STG_128, r"PRMT"],
    # SwiGLU backward: 16-byte loads of dact, gate and up, 16-byte e4m3 stores both ways, 16-byte tile writes.
    "sm90_swiglu_backward_quant_fp8_kernel": [LDG_128, STG_128, r"STS\.128"],
    "sm90_zero_ungrouped_rows_kernel": [STG_128],
    # MLA decode, template <kFp8>: wgmma S and PV, mbarriers; bf16: TMA page loads; FP8: 16-byte loads
    # into the dequantizers' registers, 16-byte tile stores, the L2 prefetch of the next page.
    "sm90_mla_decode_kernelILb0E": [r"HGMMA\.64x64x16\.F32\.BF16", r"HGMMA\.64x256x16\.F32\.BF16",
                                    r"UTMALDG\.2D", r"SYNCS"],
    "sm90_mla_decode_kernelILb1E": [r"HGMMA\.64x64x16\.F32\.BF16", r"HGMMA\.64x256x16\.F32\.BF16",
                                    LDG_128, r"STS\.128", r"UBLKPF\.L2", r"SYNCS"],
    # FP8 GEMMs (mangled sm90_fp8_gemm_kernel<BLOCK_M, BLOCK_N, GemmType, fp32 output>): e4m3 wgmma and
    # TMA tile loads; bf16 output through stmatrix and TMA stores (the grouped layouts also keep 16-byte
    # stores for tiles with rows they must not write); fp32 output through 16-byte stores; weight
    # gradients (GemmType 3 and 4) load c and store d by TMA through 3-D tensor maps ([groups][m][n]), or
    # add into d by TMA reduce when c is d.
    "sm90_fp8_gemm_kernel": [r"QGMMA\.64x\d+x32\.F32\.E4M3\.E4M3", r"UTMALDG\.2D"],
    "GemmTypeE0ELb0E": [r"STSM", r"UTMASTG"],
    "GemmTypeE1ELb0E": [r"STSM", r"UTMASTG", STG_128],
    "GemmTypeE2ELb0E": [r"STSM", r"UTMASTG", STG_128],
    "GemmTypeE0ELb1E": [STG_128],
    "GemmTypeE3ELb1E": [r"UTMALDG\.3D", r"UTMASTG\.3D", r"UTMAREDG\.3D\.ADD"],
    "GemmTypeE4ELb1E": [r"UTMALDG\.3D", r"UTMASTG\.3D", r"UTMAREDG\.3D\.ADD"],
    # EP count: the last block's ticket is a GPU-scope acq_rel atomic (L1 invalidated after it), handed
    # to the block by a barrier reduction.
    "sm90_ep_count_kernel": [r"ATOMG\.E\.ADD\.S32\.STRONG\.GPU", r"CCTL\.IVALL", r"BAR\.RED\.OR"],
}

pytestmark = pytest.mark.skipif(not deepseek_ops.cuda_kernels_built(),
                                reason=f"extension {deepseek_ops.build_summary()}: no SASS to inspect")


def _toolkit_tool(tool: str, extra: List[Path] = ()) -> str:
    """$CUDA_HOME/bin (or $CUDA_PATH/bin), /usr/local/cuda/bin, PATH, then `extra`."""
    candidates = [Path(os.environ[var]) / "bin" / tool for var in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(var)]
    candidates.append(Path("/usr/local/cuda/bin") / tool)
    if shutil.which(tool):
        candidates.append(Path(shutil.which(tool)))
    candidates += list(extra)
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    raise AssertionError(f"{tool} not found: looked in {[str(c) for c in candidates]}")


def cuobjdump_path() -> str:
    """The toolkit's cuobjdump, else the copy triton ships (torch's CUDA wheels bring triton)."""
    spec = importlib.util.find_spec("triton")
    locations = spec.submodule_search_locations if spec and spec.submodule_search_locations else []
    return _toolkit_tool("cuobjdump", [Path(loc) / "backends" / "nvidia" / "bin" / "cuobjdump" for loc in locations])


def extension_path() -> str:
    return deepseek_ops._extension._C.__file__


@functools.lru_cache(maxsize=None)
def _cuobjdump(flag: str) -> str:
    out = subprocess.run([cuobjdump_path(), flag, extension_path()], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"cuobjdump {flag} failed: {out.stderr}"
    return out.stdout


@functools.lru_cache(maxsize=None)
def sass_by_function() -> Dict[str, str]:
    """{mangled kernel name: its SASS}."""
    functions, name, lines = {}, None, []
    for line in _cuobjdump("--dump-sass").splitlines():
        match = re.match(r"\s*Function : (\S+)", line)
        if match:
            if name:
                functions[name] = "\n".join(lines)
            name, lines = match.group(1), []
        elif name:
            lines.append(line)
    if name:
        functions[name] = "\n".join(lines)
    return functions


@functools.lru_cache(maxsize=None)
def resources_by_function() -> Dict[str, Dict[str, int]]:
    """{mangled kernel name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}} from -res-usage."""
    resources, name = {}, None
    for line in _cuobjdump("-res-usage").splitlines():
        match = re.match(r"\s*Function (\S+):\s*$", line)
        if match:
            name = match.group(1)
        elif name and "REG:" in line:
            resources[name] = {k: int(v) for k, v in re.findall(r"(\w+(?:\[\d+\])?):(\d+)", line)}
            name = None
    return resources


def _matching(substring: str) -> Dict[str, str]:
    return {name: sass for name, sass in sass_by_function().items() if substring in name}


def test_every_kernel_is_sm90a():
    elf_arches = re.findall(r"arch = (\w+)", _cuobjdump("--dump-sass"))
    assert elf_arches, "no device code in the extension"
    assert set(elf_arches) == {"sm_90a"}, f"device code for {sorted(set(elf_arches))}, expected only sm_90a"


@pytest.mark.parametrize("kernel", sorted(SASS_REQUIREMENTS))
def test_kernel_sass_has_required_instructions(kernel):
    functions = _matching(kernel)
    assert functions, (f"no kernel named *{kernel}* among the {len(sass_by_function())} kernels of "
                       f"{extension_path()} (rebuilt since the last edit?)")
    for name, sass in functions.items():
        for opcode in SASS_REQUIREMENTS[kernel]:
            assert re.search(opcode, sass), f"{name}: no instruction matching {opcode!r} in its SASS"


def test_no_local_memory():
    """No spills: no LDL/STL in any kernel, and cuobjdump reports STACK:0 and LOCAL:0."""
    functions = sass_by_function()
    assert functions, "no kernels found in the SASS dump"
    offenders = [name for name, sass in functions.items() if re.search(r"\b(LDL|STL)(\.|\s)", sass)]
    assert not offenders, f"kernels using local memory (LDL/STL): {offenders}"
    resources = resources_by_function()
    assert set(resources) == set(functions), "cuobjdump -res-usage and --dump-sass list different kernels"
    bad = {name: (r["STACK"], r["LOCAL"]) for name, r in resources.items() if r["STACK"] or r["LOCAL"]}
    assert not bad, f"kernels with a stack frame or local memory (STACK, LOCAL): {bad}"


def test_wgmma_not_serialized():
    """ptxas serializes wgmma (a wait after every instruction, warning C7514) when it cannot prove
    that no accumulator in flight is read; the e4m3 MMAs of a K block must then all carry the group
    barrier (gsb0). Every kernel issuing wgmma must batch them: some wgmma without gsb0."""
    for name, sass in sass_by_function().items():
        mmas = re.findall(r"[QH]GMMA\.\S+[^\n]*", sass)
        if len(mmas) > 1:
            batched = [m for m in mmas if "gsb0" not in m]
            assert batched, f"{name}: every one of its {len(mmas)} wgmma waits for completion (serialized)"


def _dead_uniform_moves(sass: str, window: int = 4) -> List[str]:
    """`@!P R2UR ...` within `window` instructions after `PLOP3.LUT P, PT, PT, PT, PT, 0x80, 0x0` (P := true)
    with nothing between writing P: a register -> uniform-register move that never runs."""
    instructions = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;", sass)
    dead = []
    for i, instruction in enumerate(instructions):
        match = re.match(r"PLOP3\.LUT (P\d), PT, PT, PT, PT, 0x80, 0x0$", instruction)
        if not match:
            continue
        pred = match.group(1)
        for following in instructions[i + 1:i + 1 + window]:
            if re.match(rf"@!{pred} R2UR\b", following):
                dead.append(following)
                break
            if re.search(rf"^(@!?P\d )?\S+ {pred},", following) or re.search(rf"^\S+ \S+, {pred},", following):
                break
    return dead


def test_no_dead_uniform_moves():
    """A TMA coordinate taken from a value ptxas cannot prove warp-uniform (e.g. loaded from shared memory)
    goes through a loop that moves it into a uniform register. For the first of several TMA stores of such
    values, nvcc 13.0 can emit that move under a predicate set true just before: it never runs and the
    store takes a stale coordinate. Values shuffled from lane 0 (__shfl_sync) first compile without the
    pattern (benchmarks/RESULTS.md, session 22)."""
    offenders = {name: moves for name, sass in sass_by_function().items() if (moves := _dead_uniform_moves(sass))}
    assert not offenders, f"kernels with a move into a uniform register that never runs: {offenders}"


@pytest.mark.parametrize("source", ["fp8_gemm_standalone.cu", "e4m3_dequant_micro.cu", "mla_barrier_racecheck.cu",
                                    "gemm_slot_racecheck.cu"])
def test_standalone_harness_compiles(tmp_path, source):
    """The no-torch harnesses in benchmarks/ compile (the GEMM one stays in step with the launcher's header)."""
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([_toolkit_tool("nvcc"), "-std=c++20", "--expt-relaxed-constexpr", "-gencode",
                          "arch=compute_90a,code=sm_90a", f"-I{root / 'ptx'}", f"-I{root / 'csrc'}", "-c",
                          str(root / "benchmarks" / source), "-o", str(tmp_path / "harness.o")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"nvcc failed:\n{out.stderr[-4000:]}"
