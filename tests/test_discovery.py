"""Species discovery on real data: the default embedding and clustering separate the two F-HPB
enantiomers of the shared labelled sets; `stm-agent discover` writes its gallery and tables on real
scans; `refs add --from-cluster` adopts a cluster's medoids; the autoencoder trains in torch and runs
on onnxruntime alone; discovery runs without torch.

ARI bar (0.6) fixed before any method was scored, from the baselines (docs/discovery.md): random
labels ARI p99 0.053 (fhpb) / 0.101 (crops/FHPB); k-means on raw pixels handed the true k 0.89 / 1.00.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from stm_agent.adapters.labelled import load_coco, read_grey
from stm_agent.agent.config import AgentConfig
from stm_agent.agent.discovery import (DEFAULT_EMBEDDING, DEFAULT_METHOD, Objects, cluster, cluster_scores, embed,
                                       medoids, objects_from_boxes)
from stm_agent.agent.flatten import flatten
from stm_agent.agent.normalise import to_grey

ARI_BAR = 0.6
SCANS = ["au111_adsorbates_10nm_256_up.sxm", "cu111_tcne_molecules_6nm_256_up.sxm",
         "cu111_tcne_steps_clusters_50nm_256_down.sxm"]


@pytest.fixture(scope="module")
def fhpb(labelled_dir) -> Objects:
    ims, _ = load_coco(labelled_dir / "fhpb")
    items, labels = [], []
    for im in ims:
        items.append((flatten(read_grey(im.path), plane=True, rows="none"), im.boxes, (1.0, 1.0), im.path.name))
        labels += im.labels
    return objects_from_boxes(items, AgentConfig(), labels)


@pytest.fixture(scope="module")
def crops_fhpb(labelled_dir) -> Objects:
    import cv2

    cfg = AgentConfig()
    s = cfg.normalise.size_px
    greys, labels = [], []
    for cl in ("L", "R"):
        for f in sorted((labelled_dir / "crops" / "FHPB" / cl).iterdir()):
            greys.append(cv2.resize(read_grey(f), (s, s), interpolation=cv2.INTER_AREA))
            labels.append(cl)
    n = len(labels)
    return Objects(to_grey(np.stack(greys), cfg.normalise), np.zeros((n, 4)), [""] * n, np.zeros((n, 2)),
                   np.zeros((n, 4), int), 0.0, labels=labels)


def test_default_discovery_separates_the_fhpb_enantiomers(fhpb, crops_fhpb):
    """The F-HPB scene (109 molecules, L 61 / R 48): the default (k chosen blind) separates L and R.

    On crops/FHPB (the authors' own 46 crops of that scene) the silhouette alone over-splits
    (k = 7, pure clusters, ARI 0.40); merging the clusters one Gaussian explains (G-means' test,
    :func:`merge_gaussian`) brings k to 3 and ARI to 0.81 with this seed, but 0.52-0.81 over k-means
    seeds 0-9 (docs/discovery.md) and 0.52 (k 4) with the lowest supported scikit-learn/numpy: the
    bar is checked on the scene, where every seed gives the same answer; on the crops, what holds
    whatever the seed: fewer clusters, a higher ARI than the silhouette alone, each still pure.
    """
    x = embed(fhpb, DEFAULT_EMBEDDING)
    cl = cluster(x, DEFAULT_METHOD)
    sc = cluster_scores(fhpb.labels, cl.labels)
    assert sc["ari"] >= ARI_BAR, sc
    rnd = cluster_scores(fhpb.labels, np.random.default_rng(0).integers(0, 2, len(fhpb)))
    assert rnd["ari"] < 0.15
    xc = embed(crops_fhpb, DEFAULT_EMBEDDING)
    cl = cluster(xc, DEFAULT_METHOD)
    cc = cluster_scores(crops_fhpb.labels, cl.labels)
    alone = cluster_scores(crops_fhpb.labels, cluster(xc, DEFAULT_METHOD, merge=False).labels)
    assert cl.k < cl.k_silhouette and cc["ari"] > alone["ari"] + 0.1, (cc, alone)
    assert cc["purity"] >= 0.9, cc  # each cluster is one enantiomer


def test_merge_keeps_two_gaussians_apart_and_joins_one():
    """merge_gaussian on samples whose answer is known: two well-separated Gaussians split in four
    k-means clusters come back as two; one Gaussian split in four comes back as the floor, 2."""
    from sklearn.cluster import KMeans

    from stm_agent.agent.discovery import merge_gaussian

    rng = np.random.default_rng(0)
    two = np.vstack([rng.normal(0, 1, (150, 4)), rng.normal(0, 1, (150, 4)) + [6, 0, 0, 0]])
    lab = KMeans(4, n_init=10, random_state=0).fit_predict(two)
    merged = merge_gaussian(two, lab)
    assert cluster_scores(["a"] * 150 + ["b"] * 150, merged)["ari"] == 1.0
    one = rng.normal(0, 1, (300, 4))
    assert len(set(merge_gaussian(one, KMeans(4, n_init=10, random_state=0).fit_predict(one)).tolist())) == 2
    assert len(set(merge_gaussian(one, KMeans(4, n_init=10, random_state=0).fit_predict(one), min_k=1).tolist())) == 1


def test_cluster_methods_and_medoids(fhpb):
    x = embed(fhpb, "zernike")
    for m in ("kmeans", "agglomerative", "hdbscan"):
        cl = cluster(x, m)
        assert len(cl.labels) == len(fhpb) and cl.k >= 1
    cl = cluster(x, "kmeans", k=3)
    meds = medoids(x, cl.labels, n=4)
    assert sorted(meds) == [0, 1, 2] and all(len(v) == 4 and all(cl.labels[i] == c for i in v) for c, v in meds.items())
    with pytest.raises(ValueError, match="unknown clustering"):
        cluster(x, "dbscan++")
    with pytest.raises(ValueError, match="unknown embedding"):
        embed(fhpb, "clip")


def test_discover_cli_gallery_and_refs_from_cluster(sxm_dir, tmp_path):
    from stm_agent.adapters.references import ReferenceLibrary
    from stm_agent.agent.cli import app

    folder = tmp_path / "session"
    folder.mkdir()
    for n in SCANS:
        (folder / n).symlink_to(sxm_dir / n)
    out = tmp_path / "disc"
    runner = CliRunner()
    res = runner.invoke(app, ["discover", str(folder), "--out", str(out)], terminal_width=200)
    assert res.exit_code == 0, res.output
    d = json.loads((out / "discovery.json").read_text())
    assert d["embedding"] == DEFAULT_EMBEDDING and d["method"] == DEFAULT_METHOD
    assert d["k"] >= 2 and sum(c["n"] for c in d["clusters"]) == d["n_objects"] >= 10
    import cv2

    sheet = cv2.imread(str(out / "contact_sheet.png"))
    assert sheet is not None and sheet.shape[0] > 100 * d["k"] and sheet.std() > 10  # not blank
    for c in d["clusters"]:
        assert (out / f"cluster_{c['cluster']}.png").is_file()
    rows = (out / "objects.csv").read_text().splitlines()
    assert len(rows) == d["n_objects"] + 1
    # adopt the largest cluster as a species
    big = max(d["clusters"], key=lambda c: c["n"])
    refs = tmp_path / "refs"
    res = runner.invoke(app, ["refs", "add", "blob", "--from-cluster", str(big["cluster"]), "--discovery", str(out),
                              "--refs", str(refs)])
    assert res.exit_code == 0, res.output
    entries = ReferenceLibrary(refs).entries()
    assert len(entries) == min(3, big["n"]) and {e.species for e in entries} == {"blob"}
    assert all(e.provenance["discovery"]["cluster"] == big["cluster"] for e in entries)
    # adopting the cluster again passes over the medoids already adopted; once all are, one clear line
    stems = {e.path.stem for e in entries}
    for _ in range(3):
        res = runner.invoke(app, ["refs", "add", "blob", "--from-cluster", str(big["cluster"]), "--discovery",
                                  str(out), "--refs", str(refs)], terminal_width=300)
        now = ReferenceLibrary(refs).entries()
        if res.exit_code != 0:
            break
        assert len(now) > len(stems) and stems < {e.path.stem for e in now}, res.output  # only new objects
        stems = {e.path.stem for e in now}
    text = " ".join(res.output.split())
    assert res.exit_code != 0 and "is already a reference" in text and "Traceback" not in text, res.output
    assert len(ReferenceLibrary(refs).entries()) == len(stems) == len(big["medoids"])
    res = runner.invoke(app, ["refs", "add", "x", "--from-cluster", "99", "--discovery", str(out), "--refs", str(refs)])
    assert res.exit_code == 2 and "no cluster 99" in " ".join(res.output.split()) and "Traceback" not in res.output
    res = runner.invoke(app, ["discover", str(tmp_path / "nothing"), "--out", str(out)])
    assert res.exit_code == 2 and "no such file" in res.output


#: a fresh interpreter in which `import torch` fails, as on a machine without torch
NO_TORCH = (
    "import sys, importlib.abc\n"
    "class _NoTorch(importlib.abc.MetaPathFinder):\n"
    "    def find_spec(self, name, path=None, target=None):\n"
    "        if name == 'torch' or name.startswith('torch.'):\n"
    "            raise ImportError('No module named torch (blocked by the test)')\n"
    "sys.meta_path.insert(0, _NoTorch())\n"
)


def test_discovery_runs_without_torch(sxm_dir, tmp_path):
    """The default embedding never imports torch (torch blocked in a fresh interpreter)."""
    code = NO_TORCH + (
        "from stm_agent.agent.cli import app\n"
        "app([ 'discover', *sys.argv[1:-1], '--out', sys.argv[-1]])\n"
    )
    p = subprocess.run([sys.executable, "-c", code, *(str(sxm_dir / n) for n in SCANS[:2]), str(tmp_path / "o")],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert (tmp_path / "o" / "discovery.json").is_file()
    p = subprocess.run([sys.executable, "-c", code.replace("'discover',", "'discover', '--autoencoder',"),
                        str(sxm_dir / SCANS[0]), str(tmp_path / "o2")], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and "needs torch" in p.stderr and "Traceback" not in p.stderr


def test_autoencoder_trains_in_torch_and_runs_on_onnxruntime(fhpb, tmp_path):
    pytest.importorskip("torch", reason='training needs the export extra: pip install -e ".[test,export]"')
    from stm_agent.models.autoencoder import AutoencoderEncoder, train_autoencoder

    enc = train_autoencoder(fhpb.grey, tmp_path / "ae", latent=8, epochs=15, seed=0)
    meta = json.loads((tmp_path / "ae" / "autoencoder.json").read_text())
    assert meta["loss_last"] < meta["loss_first"]  # it learned something
    z = enc.embed(fhpb.grey)
    assert z.shape == (len(fhpb), 8) and np.isfinite(z).all()
    # the exported encoder runs in a process where torch cannot be imported
    code = NO_TORCH + (
            "import numpy as np\n"
            "from stm_agent.models.autoencoder import AutoencoderEncoder\n"
            "e = AutoencoderEncoder(sys.argv[1]); g = np.load(sys.argv[2]); np.save(sys.argv[3], e.embed(g))\n")
    np.save(tmp_path / "g.npy", fhpb.grey)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "ae"), str(tmp_path / "g.npy"), str(tmp_path / "z.npy")],
                   check=True, timeout=120)
    np.testing.assert_allclose(np.load(tmp_path / "z.npy"), z, rtol=1e-5, atol=1e-5)
    assert isinstance(AutoencoderEncoder(tmp_path / "ae").embed(fhpb.grey[:2]), np.ndarray)
