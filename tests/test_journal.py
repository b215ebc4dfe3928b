"""The training journal: rank 0 writes, a partial line is never read, metric names are MLflow's."""

import json
from types import SimpleNamespace

from adapterflow.tasks.journal import TrainingJournal, read_records

ARGS = SimpleNamespace(per_device_train_batch_size=4, gradient_accumulation_steps=2, world_size=2)


def _state(step: int, rank_zero: bool = True):
    return SimpleNamespace(global_step=step, max_steps=10, is_world_process_zero=rank_zero)


def test_rank_zero_writes_begin_logs_and_end_with_mlflow_names(tmp_path):
    journal = TrainingJournal(tmp_path / "progress.jsonl")
    journal.on_train_begin(ARGS, _state(0), None)
    journal.on_log(ARGS, _state(5), None, logs={"loss": 1.5, "learning_rate": 1e-3, "eval_loss": float("nan"), "epoch": 0.5})
    journal.on_train_end(ARGS, _state(10), None)
    records, offset = read_records(tmp_path / "progress.jsonl", 0)
    assert [r["event"] for r in records] == ["begin", "log", "end"]
    metrics = records[1]["metrics"]
    assert metrics["train/loss"] == 1.5 and metrics["train/learning_rate"] == 1e-3 and "eval/loss" not in metrics
    assert metrics["train/samples_per_second"] > 0  # 5 steps x 4 x 2 x 2 processes since begin
    assert offset == (tmp_path / "progress.jsonl").stat().st_size


def test_other_ranks_write_nothing(tmp_path):
    journal = TrainingJournal(tmp_path / "progress.jsonl")
    journal.on_train_begin(ARGS, _state(0, rank_zero=False), None)
    journal.on_log(ARGS, _state(1, rank_zero=False), None, logs={"loss": 1.0})
    assert not (tmp_path / "progress.jsonl").exists()


def test_step_records_are_throttled(tmp_path):
    journal = TrainingJournal(tmp_path / "progress.jsonl")
    for step in range(1, 50):
        journal.on_step_end(ARGS, _state(step), None)
    records, _ = read_records(tmp_path / "progress.jsonl", 0)
    assert [r["step"] for r in records] == [1]


def test_a_line_still_being_written_waits_for_the_next_read(tmp_path):
    path = tmp_path / "progress.jsonl"
    path.write_text(json.dumps({"event": "begin"}) + "\n" + '{"event": "lo')
    records, offset = read_records(path, 0)
    assert records == [{"event": "begin"}]
    with open(path, "a") as handle:
        handle.write('g", "step": 1}\n')
    more, end = read_records(path, offset)
    assert more == [{"event": "log", "step": 1}] and end == path.stat().st_size
    assert read_records(tmp_path / "absent.jsonl", 7) == ([], 7)


def test_follower_hands_every_record_to_each_sink_and_survives_a_broken_one(tmp_path):
    from adapterflow.tasks.journal import JournalFollower

    class Collect:
        def __init__(self):
            self.seen, self.closed = [], False

        def records(self, records):
            self.seen.extend(records)

        def close(self):
            self.closed = True

    class Broken(Collect):
        def records(self, records):
            raise RuntimeError("display gone")

    journal, good, notices = TrainingJournal(tmp_path / "progress.jsonl"), Collect(), []
    with JournalFollower(tmp_path / "progress.jsonl", [Broken(), good], interval=0.01, say=notices.append):
        journal.on_train_begin(ARGS, _state(0), None)
        for step in range(1, 4):
            journal.on_log(ARGS, _state(step), None, logs={"loss": 1.0})
    assert [r["event"] for r in good.seen] == ["begin", "log", "log", "log"] and good.closed
    assert len(notices) == 1 and "Broken stopped" in notices[0]
