from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from common.datasets import dataset_info
from common.models import ScatNet, build_model, resolve_model_name
from common.scattering import Scattering2D, morlet_kernel, scattering_channels


def test_morlet_filters_have_zero_mean_and_the_low_pass_keeps_the_mean() -> None:
    # Prepare
    psi = morlet_kernel(size=21, sigma=1.6, theta=0.3, xi=0.75 * math.pi / 2, slant=0.5)
    scattering = Scattering2D(J=2, L=8)
    flat = torch.full((1, 1, 28, 28), 0.7)

    # Execute
    out = scattering(flat)

    # Assert
    assert abs(complex(psi.sum())) < 1e-9 * float(psi.abs().sum())
    assert torch.allclose(out[0, 0], torch.full((7, 7), 0.7), atol=1e-5)  # order 0 of a flat image: its value
    assert float(out[0, 1:].abs().max()) < 1e-3  # no wavelet responds to a flat image


def test_output_layout_and_no_filters_in_the_state_dict() -> None:
    # Prepare
    scattering = Scattering2D(J=2, L=8)

    # Execute
    out = scattering(torch.rand(3, 2, 28, 28))

    # Assert
    assert scattering_channels(J=2, L=8) == 81 == scattering.channels
    assert out.shape == (3, 2 * 81, 7, 7)
    assert scattering.state_dict() == {} and list(scattering.parameters()) == []


def test_a_quarter_turn_of_the_image_turns_the_maps_and_shifts_the_orientations() -> None:
    # Prepare: 29 px, so that the stride-4 sampling grid is symmetric under a quarter turn
    L = 8
    scattering = Scattering2D(J=2, L=L)
    image = torch.rand(1, 1, 29, 29, generator=torch.Generator().manual_seed(0))

    # Execute
    plain = scattering(image)[0]
    turned = scattering(torch.rot90(image, 1, dims=(2, 3)))[0]

    # Assert: channel (j, o) of the turned image is channel (j, o + L/2) of the image, turned
    def order1(j: int, o: int) -> int:
        return 1 + j * L + o % L

    def order2(l1: int, l2: int) -> int:
        return 1 + 2 * L + (l1 % L) * L + l2 % L

    rot = lambda m: torch.rot90(m, 1, dims=(0, 1))  # noqa: E731
    assert torch.allclose(turned[0], rot(plain[0]), atol=1e-5)
    for j in range(2):
        for o in range(L):
            assert torch.allclose(turned[order1(j, o + L // 2)], rot(plain[order1(j, o)]), atol=1e-4)
    for l1 in range(L):
        for l2 in range(L):
            assert torch.allclose(turned[order2(l1 + L // 2, l2 + L // 2)], rot(plain[order2(l1, l2)]), atol=1e-4)
    assert not torch.allclose(plain[order1(0, 0)], plain[order1(0, L // 2)], atol=1e-3)  # orientations differ


def test_features_barely_move_when_the_image_shifts_by_a_pixel() -> None:
    # Prepare: a smooth random image, and the same image one pixel to the right
    g = torch.Generator().manual_seed(1)
    image = torch.nn.functional.avg_pool2d(torch.rand(1, 1, 34, 34, generator=g), 3, stride=1)[..., :30]
    a, b = image[..., :28, :28], image[..., :28, 1:29]
    scattering = Scattering2D(J=2, L=8)

    # Execute
    sa, sb = scattering(a), scattering(b)

    # Assert: pixels change by much more than the scattering features do
    pixel_change = float((a - b).norm() / a.norm())
    feature_change = float((sa - sb).norm() / sa.norm())
    assert feature_change < 0.5 * pixel_change


def test_too_small_images_and_bad_parameters_are_explained() -> None:
    with pytest.raises(ValueError, match="received 10x12 images; J=2 needs images larger than 10 pixels"):
        Scattering2D(J=2)(torch.zeros(1, 1, 10, 12))
    assert Scattering2D(J=2)(torch.zeros(1, 1, 11, 11)).shape == (1, 81, 3, 3)
    with pytest.raises(ValueError, match="J=0"):
        Scattering2D(J=0)


def test_2d_datasets_up_to_10k_records_default_to_the_scattering_models() -> None:
    # Execute / Assert: 546 and 1,080 images: the linear model; 4,708 and 7,007: the CNN on scattering
    # maps; 11,959 and more, and 3D: the compact CNN
    assert resolve_model_name("auto", dataset_info("breastmnist")) == "scatnet"
    assert resolve_model_name("auto", dataset_info("retinamnist")) == "scatnet"
    assert resolve_model_name("auto", dataset_info("pneumoniamnist")) == "scatcnn"
    assert resolve_model_name("auto", dataset_info("dermamnist")) == "scatcnn"
    assert resolve_model_name("auto", dataset_info("bloodmnist")) == "cnn"
    assert resolve_model_name("auto", dataset_info("adrenalmnist3d")) == "cnn-3d"
    assert isinstance(build_model("auto", dataset_info("breastmnist")), ScatNet)
    net = build_model("scatnet", dataset_info("dermamnist"))
    assert sum(p.numel() for p in net.parameters()) == 3 * 81 * 49 * 7 + 7


def test_the_mirror_model_scores_an_image_and_its_mirror_alike_and_keeps_scatnets_weights() -> None:
    # Prepare: one image that is not symmetric, and its left-right mirror
    info = dataset_info("breastmnist")
    mirror, plain = build_model("scatnet-mirror", info, seed=0).eval(), build_model("scatnet", info, seed=0).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    flipped = torch.flip(x, dims=[-1])

    # Execute
    with torch.no_grad():
        scores, flipped_scores = mirror(x), mirror(flipped)
        plain_scores, plain_flipped = plain(x), plain(flipped)

    # Assert: invariant (the plain model is not), with the same weights, so checkpoints move between the two
    torch.testing.assert_close(scores, flipped_scores, rtol=0, atol=1e-6)
    assert float((plain_scores - plain_flipped).abs().max()) > 1e-3
    assert {k: v.shape for k, v in mirror.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    # the mirror model is the plain one on the mean of both views' features
    torch.testing.assert_close(mirror.features(x), 0.5 * (plain.features(x) + plain.features(flipped)))


def test_the_mirror_cnn_scores_an_image_and_its_mirror_alike_through_every_path() -> None:
    # Prepare: scatcnn and scatcnn-mirror with the same weights, a batch of asymmetric images and their mirrors
    from common.models import fixed_front, split_for_cam

    info = dataset_info("pneumoniamnist")
    mirror, plain = build_model("scatcnn-mirror", info, seed=0).eval(), build_model("scatcnn", info, seed=0).eval()
    x = torch.rand(3, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    flipped = torch.flip(x, dims=[-1])
    front, trainable = fixed_front(mirror) or (None, None)
    body, head = split_for_cam(mirror)
    assert front is not None and trainable is not None

    # Execute
    with torch.no_grad():
        scores, flipped_scores, plain_scores = mirror(x), mirror(flipped), plain(x)
        by_front, by_cam = trainable(front(x)), head(body(x))
        plain_maps = torch.nn.Sequential(plain.scattering, plain.norm)
        expected_maps = 0.5 * (plain_maps(x) + plain_maps(flipped))

    # Assert: invariant, unlike scatcnn with the same weights; training on the fixed front and Grad-CAM's split
    # compute the same scores; the front is the mean of both views' maps
    torch.testing.assert_close(scores, flipped_scores, rtol=0, atol=1e-6)
    assert float((plain_scores - plain(flipped)).abs().max()) > 1e-4
    torch.testing.assert_close(by_front, scores)
    torch.testing.assert_close(by_cam, scores)
    torch.testing.assert_close(front(x), expected_maps)
    assert {k: v.shape for k, v in mirror.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}


def test_grad_cam_of_the_mirror_model_follows_the_image_when_it_is_mirrored() -> None:
    # Prepare: the mirror model with random weights, split for Grad-CAM as export does
    from client.explain import grad_cam
    from common.models import ExplainableModel

    model = ExplainableModel(build_model("scatnet-mirror", dataset_info("breastmnist"), seed=2)).eval()
    x = torch.rand(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))

    # Execute
    heat, heat_flipped = grad_cam(model, x), grad_cam(model, torch.flip(x, dims=[-1]))

    # Assert: the heatmap is drawn in the image's own coordinates (mirroring the image mirrors it), and it
    # is not a left-right symmetric map that would point at both a finding and its mirror place
    assert heat.shape == (28, 28)
    assert float(heat.max()) == 1.0
    np.testing.assert_allclose(heat_flipped, heat[:, ::-1], atol=1e-5)
    assert float(np.abs(heat - heat[:, ::-1]).max()) > 0.05
