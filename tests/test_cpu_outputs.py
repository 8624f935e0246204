"""The CPU kernels' large outputs are advised as transparent huge pages (csrc/cpu/output.h).

A fresh 32 MiB gradient costs ~8k page faults on first touch with 4 KiB pages, which on one core takes
longer than the class_gather backward that writes it. The kernels advise the whole 2 MiB pages inside
each large output MADV_HUGEPAGE before writing it; these tests check that the advice reaches the
kernel's memory map (values are checked by tests/ops).
"""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastctx
from fastctx import ops

_THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
_SMAPS = Path("/proc/self/smaps")

pytestmark = pytest.mark.skipif(
    not (_THP.exists() and _SMAPS.exists()) or "[never]" in _THP.read_text(),
    reason="needs Linux with transparent huge pages not disabled",
)

_HUGE = 2 << 20


def _vma_flags(address: int) -> tuple[list[str], int]:
    """VmFlags and THPeligible of the mapping holding `address` in this process."""
    lines = _SMAPS.read_text().splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"([0-9a-f]+)-([0-9a-f]+) ", line)
        if m and int(m.group(1), 16) <= address < int(m.group(2), 16):
            flags, eligible = [], -1
            for entry in lines[i + 1:]:
                if re.match(r"[0-9a-f]+-[0-9a-f]+ ", entry):
                    break
                if entry.startswith("VmFlags:"):
                    flags = entry.split()[1:]
                if entry.startswith("THPeligible:"):
                    eligible = int(entry.split()[1])
            return flags, eligible
    raise AssertionError(f"no mapping holds {address:#x}")


def _interior(t: torch.Tensor) -> int:
    """An address inside the first whole 2 MiB page of t's buffer."""
    start = t.data_ptr()
    first = (start + _HUGE - 1) // _HUGE * _HUGE
    assert first + _HUGE <= start + t.numel() * t.element_size(), "tensor too small for a whole huge page"
    return first


def test_large_gradient_is_advised_huge_pages():
    feats = torch.randn(2, 512, 64, 128, requires_grad=True)  # 32 MiB: a fresh mmap, not heap memory
    probs = torch.randn(2, 19, 64, 128, requires_grad=True)
    with fastctx.use_backend("cpu"):
        ops.class_gather(feats, probs, "ocr").sum().backward()
    flags, eligible = _vma_flags(_interior(feats.grad))
    assert "hg" in flags, f"grad_feats' pages were not advised MADV_HUGEPAGE (VmFlags {flags})"
    assert eligible == 1


def test_input_memory_is_not_advised():
    # The advice is for the kernels' own outputs: the kernel leaves its inputs' pages alone. Checked in a
    # fresh process: in a long-lived one glibc may hand an input heap pages that an earlier, freed output
    # was advised on, and the advice stays with those pages.
    script = f"""
import re, sys, torch, fastctx
from fastctx import ops
sys.path.insert(0, {str(Path(__file__).parent)!r})
from test_cpu_outputs import _interior, _vma_flags
feats = torch.randn(2, 512, 64, 128, requires_grad=True)
probs = torch.randn(2, 19, 64, 128, requires_grad=True)
with fastctx.use_backend("cpu"):
    ops.class_gather(feats, probs, "ocr").sum().backward()
print("input", " ".join(_vma_flags(_interior(feats))[0]))
print("grad", " ".join(_vma_flags(_interior(feats.grad))[0]))
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    flags = dict(line.split(" ", 1) for line in run.stdout.strip().splitlines())
    assert "hg" in flags["grad"].split(), f"the output was not advised (VmFlags {flags['grad']})"
    assert "hg" not in flags["input"].split(), f"the input's pages were advised (VmFlags {flags['input']})"
