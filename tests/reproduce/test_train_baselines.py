"""The baseline command trains once, caches a checkpoint, and load_or_train reloads it while the settings match."""
import torch

from benchmarks.reproduce.train_baselines import checkpoint_path, load_or_train, main


def test_command_trains_and_caches_then_load_or_train_reuses_the_checkpoint(tmp_path, capsys):
    assert main(["--model", "resnet20", "--data", "digits", "--epochs", "1", "--no-progress",
                 "--cache-dir", str(tmp_path)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    path = checkpoint_path("resnet20", "digits", 0, tmp_path)
    assert path == tmp_path / "resnet20_digits_seed0.pt" and path.is_file()
    saved = torch.load(path, weights_only=True)
    assert (saved["model"], saved["data"], saved["epochs"], saved["seed"]) == ("resnet20", "digits", 1, 0)

    cached = load_or_train("resnet20", "digits", epochs=1, seed=0, cache_dir=tmp_path)
    assert cached.checkpoint == path
    assert not cached.model.training
    assert cached.test_accuracy == saved["test_accuracy"] and 0.0 <= cached.test_accuracy <= 1.0
    assert cached.train_seconds == saved["train_seconds"]  # loaded, not trained again
    for name, tensor in cached.model.state_dict().items():
        assert torch.equal(tensor, saved["state_dict"][name])
