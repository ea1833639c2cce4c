"""load_or_train trains once, caches a checkpoint, and reloads it while the settings match."""
import torch

from benchmarks.reproduce.train_baselines import checkpoint_path, load_or_train, main


def test_trains_then_reuses_the_cached_checkpoint(tmp_path):
    first = load_or_train("resnet20", "digits", epochs=1, seed=0, cache_dir=tmp_path)
    assert first.checkpoint == checkpoint_path("resnet20", "digits", 0, tmp_path)
    assert first.checkpoint.is_file()
    assert 0.0 <= first.test_accuracy <= 1.0
    assert not first.model.training

    second = load_or_train("resnet20", "digits", epochs=1, seed=0, cache_dir=tmp_path)
    assert second.test_accuracy == first.test_accuracy
    assert second.train_seconds == first.train_seconds
    for a, b in zip(first.model.state_dict().values(), second.model.state_dict().values()):
        assert torch.equal(a, b)

    saved = torch.load(first.checkpoint, weights_only=True)
    assert (saved["model"], saved["data"], saved["epochs"], saved["seed"]) == ("resnet20", "digits", 1, 0)


def test_command_prints_test_accuracy(tmp_path, capsys):
    assert main(["--model", "resnet20", "--data", "digits", "--epochs", "1", "--no-progress",
                 "--cache-dir", str(tmp_path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (tmp_path / "resnet20_digits_seed0.pt").is_file()
