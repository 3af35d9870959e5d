"""The throughput benchmark runs end to end on a few natural photos."""

import json

from vit_jax import cli
from vit_jax.data import presets
from vit_jax.tools import input_benchmark
from vit_jax.tools.sample_photos import write_photo_folder


def test_sample_photos_are_natural_500x375(tmp_path):
    from PIL import Image

    paths = write_photo_folder(str(tmp_path), num_images=4, num_classes=2)
    assert len(paths) == 4
    with Image.open(paths[0]) as img:
        assert img.size == (500, 375) and img.format == "JPEG"
        pixels = img.convert("L").getextrema()
        assert pixels[1] - pixels[0] > 100  # Real photo content, not a flat colour.


def test_benchmark_reports_both_pipelines(tmp_path):
    write_photo_folder(str(tmp_path), num_images=8, num_classes=2)
    cfg = presets.get_data_config(f"folder:{tmp_path}")
    result = input_benchmark.measure(cfg, batch_size=4, num_batches=2, warmup=1, compare_bare=True)
    assert result["images_per_s"] > 0 and result["bare_images_per_s"] > 0
    assert abs(result["ratio"] - result["images_per_s"] / result["bare_images_per_s"]) < 0.01
    assert result["pp"].startswith("decode_jpeg_and_inception_crop(224)|flip_lr")
    json.dumps(result)


def test_benchmark_cli_on_preset(capsys):
    assert (
        cli.run(
            "input_benchmark",
            ["--config", "digits", "--batch_size", "32", "--num_batches", "3", "--warmup", "1"],
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["config"] == "digits" and result["images_per_s"] > 0


def test_benchmark_loads_python_config_file(tmp_path):
    path = tmp_path / "my_config.py"
    path.write_text(
        "import ml_collections\n"
        "from vit_jax.data import get_data_config\n\n\n"
        "def get_config():\n"
        "    return ml_collections.ConfigDict({'data': get_data_config('digits', image_size=8)})\n"
    )
    cfg = input_benchmark.load_config(str(path))
    assert cfg.name == "digits" and cfg.image_size == 8


def test_resume_benchmark_on_generated_jft(tmp_path, capsys):
    argv = ["--config", "jft_synthetic", "--num_records", "400", "--num_shards", "20"]
    argv += ["--batch_size", "8", "--resume_at", "0.9", "--compare_legacy"]
    assert cli.run("input_benchmark", [*argv, "--data_dir", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["num_records"] == 400 and result["num_shards"] == 20
    start, deep = result["resume"]
    assert start["step"] == 0 and deep["step"] == 50 + 45  # 90% into the second epoch.
    assert result["position"] == [0, 95 * 8]
    # Resuming reads at most one round (4 files of 20 records), wherever it resumes.
    assert 0 < start["records_read"] <= 80 and 0 < deep["records_read"] <= 80
    assert deep["first_batch_s"] > 0
    # The old way reads everything before the position within the epoch (360 of 400).
    assert result["legacy"][1]["records_read"] >= 360
