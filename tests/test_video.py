"""Media decoding: §8.2 frame sampling (hand-computed indices), mp4 round trips, bicubic resize against
PyTorch's antialiased bicubic (what torchvision's `Resize(antialias=True)` runs on uint8 tensors),
normalisation, images / frame folders / given frames, and one clear MediaError per corrupt input."""

import io

import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tpo_jax.data.records import Record, RecordError
from tpo_jax.data.video import (MediaError, decode_frame_dir, decode_image, decode_jpeg_frames,
                        decode_video, encode_jpeg_frames, encode_mp4, load_media, normalize, read_video_frames,
                        resize_frames, sample_indices)


def smooth_frames(t, h, w):
    """A moving colour pattern: every frame differs from its neighbours, no edges for the codec to blur."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    k = np.arange(t, dtype=np.float32)[:, None, None]
    r = 128 + 90 * np.sin(xx / 9 + k / 4)
    g = 128 + 90 * np.cos(yy / 7 - k / 5)
    b = 128 + 60 * np.sin((xx + yy) / 13 + k / 6)
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def torch_bicubic_aa(frames_u8, size):
    """torchvision Resize((H, W), BICUBIC, antialias=True) on a uint8 tensor: float interpolate, clamp, round."""
    x = torch.from_numpy(frames_u8).permute(0, 3, 1, 2).float()
    y = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
    return y.clamp(0, 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


# --- sampling (MODEL-SPEC §8.2), expected values computed by hand -------------------------------------------------

SAMPLING_CASES = [
    # vlen 100: edges int(k * 6.25) = 0 6 12 18 25 31 37 43 50 56 62 68 75 81 87 93 100;
    # index ⌊(a + b) / 2⌋ with a = edges[i], b = edges[i + 1] − 1
    (100, 25.0, [2, 8, 14, 21, 27, 33, 39, 46, 52, 58, 64, 71, 77, 83, 89, 96]),
    # vlen 40: edges int(k * 2.5) = 0 2 5 7 10 12 15 17 20 22 25 27 30 32 35 37 40
    (40, 10.0, [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 35, 38]),
    # vlen 17: edges 0 1 … 15 17 (int(15 * 1.0625) = 15, int(16 * 1.0625) = 17) → last segment [15, 16] → 15
    (17, 30.0, list(range(16))),
    (16, 8.0, list(range(16))),
    # fewer frames than samples: every frame once, then the last index repeated
    (5, 2.0, [0, 1, 2, 3, 4] + [4] * 11),
    (1, 24.0, [0] * 16),
]


@pytest.mark.parametrize("vlen,fps,expected", SAMPLING_CASES)
def test_middle_sampling_matches_hand_computed_indices(vlen, fps, expected):
    idx, ts = sample_indices(vlen, 16, fps)
    assert idx.tolist() == expected
    np.testing.assert_allclose(ts, np.array(expected) / fps)


def test_timestamps_and_random_sampling():
    idx, ts = sample_indices(100, 16, 25.0)
    assert [str(round(t, 1)) for t in ts[:4]] == ["0.1", "0.3", "0.6", "0.8"]  # 2/25, 8/25, 14/25, 21/25
    rng = np.random.default_rng(0)
    edges = [0, 6, 12, 18, 25, 31, 37, 43, 50, 56, 62, 68, 75, 81, 87, 93, 100]
    draws = np.stack([sample_indices(100, 16, 25.0, mode="rand", rng=rng)[0] for _ in range(200)])
    assert np.all(draws >= np.array(edges[:-1])) and np.all(draws <= np.array(edges[1:]) - 1)
    assert (draws[:, 0] == 0).any() and (draws[:, 0] == 5).any()  # both ends of a segment are drawn
    with pytest.raises(ValueError, match="rng"):
        sample_indices(100, 16, 25.0, mode="rand")
    with pytest.raises(ValueError, match="num_video_frames"):
        sample_indices(0, 16, 25.0)


# --- resize and normalisation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((90, 120), (32, 48)), ((20, 30), (56, 40)), ((64, 48), (224, 224))])
def test_bicubic_resize_matches_torch_antialiased_bicubic(src, dst):
    rng = np.random.default_rng(1)
    h, w = src
    yy, xx = np.mgrid[0:h, 0:w]
    img = 127 + 100 * np.sin(xx / 5.0) * np.cos(yy / 7.0) + rng.normal(0, 25, (h, w))
    frames = np.stack([img, img[::-1], 255 - img], -1).clip(0, 255).astype(np.uint8)[None].repeat(2, 0)
    ours = resize_frames(frames, dst)
    ref = torch_bicubic_aa(frames, dst)
    assert ours.shape == (2, *dst, 3) and ours.dtype == np.uint8
    diff = np.abs(ours.astype(int) - ref)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3  # only rounding ties of float32 sums differ
    plain = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=dst, mode="bicubic",
                          align_corners=False).clamp(0, 255).round().permute(0, 2, 3, 1).numpy()
    assert np.abs(ours.astype(float) - plain).max() > 2  # not the non-antialiased (a = -0.75) kernel


def test_normalize_imagenet():
    x = normalize(np.array([[255, 0, 128]], np.uint8))
    expected = [(1 - 0.485) / 0.229, (0 - 0.456) / 0.224, (128 / 255 - 0.406) / 0.225]
    np.testing.assert_allclose(x[0], expected, rtol=1e-6)
    assert x.dtype == np.float32


# --- video round trips -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["libx264", "mpeg4"])
def test_mp4_round_trip_matches_source_frames(codec, tmp_path):
    src = smooth_frames(40, 48, 64)
    data = encode_mp4(src, 20.0, codec=codec, crf=10)
    path = tmp_path / "clip.mp4"
    path.write_bytes(data)
    frames, idx, ts, duration, fps = read_video_frames(str(path), 16)
    assert idx.tolist() == [0, 3, 5, 8, 10, 13, 15, 18, 20, 23, 25, 28, 30, 33, 35, 38]  # vlen 40 row above
    assert fps == 20.0 and duration == 2.0
    np.testing.assert_allclose(ts, idx / 20.0)
    err = np.abs(frames.astype(int) - src[idx])
    assert err.mean() < 4.0 and np.percentile(err, 99) < 15  # 4:2:0 chroma + lossy codec
    # each decoded frame is closest to the source frame it claims to be (sampling, not just codec, is right)
    dist = np.abs(frames[:, None].astype(int) - src[None].astype(int)).mean(axis=(2, 3, 4))
    assert dist.argmin(axis=1).tolist() == idx.tolist()
    # bytes and path decode identically; decode_video = resize + normalise of those frames
    again = read_video_frames(data, 16)[0]
    np.testing.assert_array_equal(again, frames)
    media = decode_video(data, 16, (32, 40))
    np.testing.assert_allclose(media.frames, normalize(resize_frames(frames, (32, 40))), atol=1e-6)
    assert media.source_size == (48, 64) and media.frames.shape == (16, 32, 40, 3)


def test_seeking_decode_equals_sequential_decode():
    src = smooth_frames(120, 32, 48)
    data = encode_mp4(src, 30.0, keyint=9)  # 14 key frames, B-frames: exercises the forward seeks
    with av.open(io.BytesIO(data)) as c:
        every = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    for seed in range(3):
        frames, idx, *_ = read_video_frames(data, 16, mode="rand", rng=np.random.default_rng(seed))
        np.testing.assert_array_equal(frames, every[idx])


def test_short_video_pads_with_last_frame():
    src = smooth_frames(5, 32, 32)
    frames, idx, ts, duration, fps = read_video_frames(encode_mp4(src, 10.0, crf=10), 16)
    assert idx.tolist() == [0, 1, 2, 3, 4] + [4] * 11 and duration == 0.5
    for k in range(5, 16):
        np.testing.assert_array_equal(frames[k], frames[4])
    dist = np.abs(frames[:5, None].astype(int) - src[None].astype(int)).mean(axis=(2, 3, 4))
    assert dist.argmin(axis=1).tolist() == [0, 1, 2, 3, 4]


# --- corrupt and missing media -----------------------------------------------------------------------------------


def test_truncated_mp4_raises_media_error(tmp_path):
    src = smooth_frames(30, 32, 32)
    index_at_end = encode_mp4(src, 10.0)
    index_first = encode_mp4(src, 10.0, faststart=True)
    path = tmp_path / "cut.mp4"
    path.write_bytes(index_at_end[: len(index_at_end) // 2])
    with pytest.raises(MediaError, match=r"cut\.mp4: cannot open video") as e:
        decode_video(str(path), 16, 32)
    assert isinstance(e.value, RecordError)
    with pytest.raises(MediaError, match=r"truncated video: header lists 30 frames, only \d+ readable"):
        decode_video(index_first[: len(index_first) * 2 // 3], 16, 32)
    with pytest.raises(MediaError, match="cannot open video"):
        decode_video(b"\x00\x00\x00\x18ftypmp42" + bytes(200), 16, 32)


def test_missing_media_names_record_and_file(tmp_path):
    missing = str(tmp_path / "nope.mp4")
    with pytest.raises(MediaError, match=r"nope\.mp4: video file not found"):
        decode_video(missing)
    rec = Record(id="clip-7", task="conversation", video=missing, turns=[("q", "a")])
    with pytest.raises(MediaError, match=r"record 'clip-7': .*nope\.mp4: video file not found"):
        load_media(rec, 16, 32)
    rec = Record(id="img-3", task="region", image=b"not an image")
    with pytest.raises(MediaError, match=r"record 'img-3': <12 bytes>: cannot decode image"):
        load_media(rec, 16, 32)


# --- images, frame folders, JPEG frames, given frames ------------------------------------------------------------


def test_image_is_one_frame(tmp_path):
    img = smooth_frames(1, 30, 20)[0]
    path = tmp_path / "img.png"
    Image.fromarray(img).save(path)
    media = decode_image(str(path), (24, 16))
    assert media.frames.shape == (1, 24, 16, 3) and media.source_size == (30, 20)
    np.testing.assert_allclose(media.frames[0], normalize(torch_bicubic_aa(img[None], (24, 16))[0]), atol=0.02)
    same = load_media(Record(id="i", task="region", image=path.read_bytes(), boxes=np.array([[0, 0, 1, 1.0]])),
                      16, (30, 20))
    np.testing.assert_allclose(same.frames[0], normalize(img), atol=1e-6)  # PNG is lossless, no resize


def test_jpeg_frames_round_trip_and_frame_folder(tmp_path):
    src = smooth_frames(12, 32, 40)
    jpegs = encode_jpeg_frames(src, quality=95)
    back = decode_jpeg_frames(jpegs)
    assert back.shape == src.shape and np.abs(back.astype(int) - src).mean() < 3.0
    folder = tmp_path / "frames"
    folder.mkdir()
    for i, b in enumerate(jpegs):
        (folder / f"{i:05d}.jpg").write_bytes(b)
    media = decode_frame_dir(str(folder), fps=6.0, num_frames=4, size=(32, 40))
    # vlen 12, 4 samples: edges 0 3 6 9 12 → middles 1 4 7 10
    assert media.indices.tolist() == [1, 4, 7, 10] and media.duration == 2.0
    np.testing.assert_allclose(media.frames, normalize(back[[1, 4, 7, 10]]), atol=1e-6)
    via_record = load_media(Record(id="f", task="mask", video=str(folder), fps=6.0,
                                   track_boxes=np.zeros((1, 4))), 4, (32, 40))
    np.testing.assert_array_equal(via_record.frames, media.frames)
    with pytest.raises(MediaError, match="frame 1: cannot decode image"):
        decode_jpeg_frames([jpegs[0], b"garbage"])


def test_given_frames_are_resized_and_sampled():
    frames = smooth_frames(8, 16, 16)
    rec = Record(id="s", task="conversation", frames=frames, fps=4.0, turns=[("q", "a")])
    same = load_media(rec, 8, 16)
    np.testing.assert_allclose(same.frames, normalize(frames), atol=1e-6)
    np.testing.assert_allclose(same.timestamps, np.arange(8) / 4.0)
    fewer = load_media(rec, 4, 8)  # vlen 8, 4 samples: edges 0 2 4 6 8 → middles 0 2 4 6
    assert fewer.indices.tolist() == [0, 2, 4, 6] and fewer.frames.shape == (4, 8, 8, 3)
    np.testing.assert_allclose(fewer.frames, normalize(torch_bicubic_aa(frames[[0, 2, 4, 6]], (8, 8))), atol=0.02)
    with pytest.raises(MediaError, match="uint8"):
        load_media(Record(id="b", task="conversation", frames=frames.astype(np.float32), turns=[("q", "a")]))


def test_encode_mp4_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        encode_mp4(np.zeros((2, 15, 16, 3), np.uint8), 10.0)


# --- hostile media (issue 26): budgets checked before decoding, content must match the name ----------------------


def test_bomb_images_are_rejected_from_the_header_before_decoding(tmp_path):
    import tracemalloc

    from tpo_jax.data.poisoned import bomb_jpeg, bomb_png
    from tpo_jax.data.records import MediaBudget

    jpeg = bomb_jpeg(9000, 9000)  # decoding it would take 9000 * 9000 * 3 bytes = 232 MB, PIL's RGB even 324 MB
    assert len(jpeg) < 1000
    (tmp_path / "bomb.jpg").write_bytes(jpeg)
    tracemalloc.start()
    with pytest.raises(MediaError) as e:
        decode_image(tmp_path / "bomb.jpg", budget=MediaBudget(max_pixels=50_000_000))
    with pytest.raises(MediaError) as e2:
        decode_image(bomb_png(20000, 20000))  # over PIL's own 179 Mpx limit: refused at Image.open
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 5 << 20
    assert e.value.kind == "media_budget" and str(e.value) == (
        f"{tmp_path / 'bomb.jpg'}: image size 9000x9000 = 81000000 pixels is over the media budget "
        "max_pixels=50000000")
    assert e2.value.kind == "media_budget" and str(e2.value).startswith("<") and "max_pixels" in str(e2.value)


def test_image_named_mp4_is_not_a_one_frame_video(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(buf, format="JPEG")
    (tmp_path / "clip.mp4").write_bytes(buf.getvalue())
    rec = Record(id="v", task="conversation", video=str(tmp_path / "clip.mp4"), turns=[("q", "a")])
    with pytest.raises(MediaError) as e:
        load_media(rec, 4, 16)
    assert e.value.kind == "media_kind"
    assert str(e.value) == f"record 'v': {tmp_path / 'clip.mp4'}: content is image JPEG, expected a video"
    with pytest.raises(MediaError, match="content is image JPEG, expected a video"):
        decode_video(buf.getvalue(), 4, 16)  # bytes: the content alone decides
    mp4 = encode_mp4(np.zeros((2, 16, 16, 3), np.uint8), 2.0)
    (tmp_path / "still.jpg").write_bytes(mp4)
    with pytest.raises(MediaError, match=r"still.jpg: content is video MP4/MOV, expected an image") as e:
        decode_image(tmp_path / "still.jpg")
    assert e.value.kind == "media_kind"
    (tmp_path / "frame.mp4").write_bytes(b"\x00" * 64)  # unknown content, but named like a video
    with pytest.raises(MediaError, match=r"frame.mp4: file named '.mp4' read as an image"):
        decode_image(tmp_path / "frame.mp4")


def test_video_budgets_checked_before_decoding(tmp_path):
    from tpo_jax.data.records import MediaBudget

    mp4 = encode_mp4(np.zeros((10, 32, 48, 3), np.uint8), 5.0)
    cases = [(MediaBudget(max_pixels=1000), "frame size 48x32 = 1536 pixels is over the media budget max_pixels=1000"),
             (MediaBudget(max_frames=4), "over the media budget max_frames=4"),
             (MediaBudget(max_seconds=1.5), "over the media budget max_seconds=1.5"),
             (MediaBudget(max_bytes=100), f"video of {len(mp4)} bytes is over the media budget max_bytes=100"),
             (MediaBudget(max_decoded_bytes=10000), "over the media budget max_decoded_bytes=10000")]
    for budget, msg in cases:
        with pytest.raises(MediaError) as e:
            read_video_frames(mp4, 4, name="clip-7", budget=budget)
        assert e.value.kind == "media_budget" and str(e.value).startswith("clip-7: ") and msg in str(e.value), budget
    frames, *_ = read_video_frames(mp4, 4, budget=MediaBudget(max_pixels=1536, max_frames=10))
    assert frames.shape == (4, 32, 48, 3)
