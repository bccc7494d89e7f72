"""The job folder: chunk files and their manifest entries, results ordered by index, the report;
a truncated or corrupt chunk is detected and recomputed, the others kept; the user's own files
(a PNG folder, .npy, .pt, .safetensors) give the same problems as the bundled dataset."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from dflow_fast import jobs
from dflow_fast.data import fashion_mnist

from .helpers import TINY, chunk_stats, same_results

pytest.importorskip("safetensors")
INDICES = "0:5"  # 5 problems: chunks of 2, 2 and 1


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("job") / "out"
    report = jobs.run(data="fashion-mnist:test", indices=INDICES, out=str(out), **TINY)
    return out, report


def test_layout_results_and_report(job):
    out, report = job
    results, names = jobs.load_results(out)
    assert names == list(jobs.STATUS_NAMES)
    assert set(results) == set(jobs.KEYS)
    assert results["index"].tolist() == [0, 1, 2, 3, 4]
    assert results["x0"].shape == results["x1"].shape == (5, 1, 28, 28)
    assert all(results[k].shape == (5,) for k in ("loss", "nit", "nfev", "nfe", "status"))
    assert all(names[c] in ("converged", "target", "max_iter", "max_eval")
               for c in results["status"].tolist())
    # every chunk: its file's SHA-256 is in its manifest entry and in the final manifest
    manifest = json.loads((out / "chunks" / "manifest.json").read_text())
    assert [e["chunk"] for e in manifest["chunks"]] == [0, 1, 2]
    for e in manifest["chunks"]:
        data = (out / "chunks" / e["file"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == e["sha256"] and len(data) == e["bytes"]
    assert [e["problems"] for e in manifest["chunks"]] == [[0, 2], [2, 4], [4, 5]]
    # chunk k holds problems 2k, 2k+1: its rows are the results' rows
    from safetensors.torch import load_file
    c1 = load_file(str(out / "chunks" / "chunk-00001.safetensors"))
    assert torch.equal(c1["x1"], results["x1"][2:4]) and c1["index"].tolist() == [2, 3]
    assert not list(out.rglob(".*.tmp-*"))  # no temporary left behind
    saved = json.loads((out / "report.json").read_text())
    assert saved["provenance"]["torch"] == torch.__version__
    assert {"commit", "dirty", "dflow_fast", "torch_cuda", "device"} <= set(saved["provenance"])
    assert saved["quality"]["psnr"]["D-Flow (dflow_fast)"] > 0
    assert saved["summary"]["velocity_evaluations"] == int(results["nfe"].sum())
    assert saved["grids"] and (out / saved["grids"][0]).stat().st_size > 0
    assert "| PSNR |" in (out / "report.md").read_text()


@pytest.mark.parametrize("damage", ["truncate", "flip", "no_entry"])
def test_damaged_chunk_is_recomputed_and_the_rest_kept(job, tmp_path, damage):
    ref, _ = job
    out = tmp_path / "out"
    import shutil
    shutil.copytree(ref, out)
    (out / "results.safetensors").unlink()
    target = out / "chunks" / "chunk-00001.safetensors"
    data = target.read_bytes()
    if damage == "truncate":
        target.write_bytes(data[: len(data) // 2])
    elif damage == "flip":  # same size, one payload byte changed
        target.write_bytes(data[:-9] + bytes([data[-9] ^ 1]) + data[-8:])
    else:  # killed between the chunk's rename and its entry's
        (out / "chunks" / "chunk-00001.json").unlink()
    before = chunk_stats(out)
    report = jobs.run(data="fashion-mnist:test", indices=INDICES, out=str(out), resume=True,
                      **TINY)
    after = chunk_stats(out)
    assert report["chunks"]["kept"] == 2 and report["chunks"]["computed"] == 1
    assert after["chunk-00000.safetensors"] == before["chunk-00000.safetensors"]
    assert after["chunk-00002.safetensors"] == before["chunk-00002.safetensors"]
    assert after["chunk-00001.safetensors"] != before["chunk-00001.safetensors"]
    same_results(ref, out)


def test_resuming_a_finished_job_recomputes_nothing(job, tmp_path):
    ref, _ = job
    import shutil
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    before = chunk_stats(out)
    report = jobs.run(data="fashion-mnist:test", indices=INDICES, out=str(out), resume=True,
                      **TINY)
    assert report["chunks"]["computed"] == 0 and chunk_stats(out) == before
    same_results(ref, out)


def test_a_torchrun_restart_resumes(job, tmp_path, monkeypatch):
    """A worker torchrun restarted (--max-restarts) finds its folder non-empty: it resumes
    rather than refusing, as if --resume were given."""
    ref, _ = job
    import shutil
    out = tmp_path / "out"
    shutil.copytree(ref, out)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    report = jobs.run(data="fashion-mnist:test", indices=INDICES, out=str(out), **TINY)
    assert report["chunks"]["computed"] == 0 and report["chunks"]["kept"] == 3


def _png_folder(folder, images):
    from PIL import Image
    folder.mkdir()
    for i, x in enumerate(images):
        pixels = ((x[0].numpy() + 1) * 127.5).round().astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:03d}.png")


@pytest.mark.parametrize("kind", ["png", "npy", "pt", "safetensors"])
def test_own_files_give_the_bundled_datasets_results(job, tmp_path, kind):
    """Fashion-MNIST's first 2 test images written as the user's own data (uint8 pixels or the
    same float32 values): same problems (index = position in the data), so the same results as
    the bundled dataset's first chunk."""
    pytest.importorskip("PIL")
    ref, _ = job
    images, labels = fashion_mnist("test", limit=2)
    pixels = ((images + 1) * 127.5).round().to(torch.uint8)
    path = tmp_path / f"data.{kind}"
    if kind == "png":
        path = tmp_path / "pngs"
        _png_folder(path, images)
    elif kind == "npy":
        np.save(path, pixels.numpy())
    elif kind == "pt":
        torch.save({"images": images, "labels": labels}, path)
    else:
        from safetensors.torch import save_file
        save_file({"images": pixels, "labels": labels}, str(path))
    out = tmp_path / "out"
    jobs.run(data=str(path), out=str(out), **TINY)
    same_results(ref, out, rows=slice(0, 2))
