"""epochs.csv has one reader (coupled_net.epochlog): the same rows are whole for the trainer's resume
and for the review, and results.json and the review take their per-run numbers from one aggregate."""

from __future__ import annotations

import math

import pytest

from coupled_net.epochlog import epoch_log, epoch_summary, read_epochs
from coupled_net.results import epoch_fields

HEADER = ("epoch,lr,train_loss,train_acc,val_loss,val_acc,ke_val_loss,ke_val_acc,epoch_time_s,ke_time_s,"
          "ke_eval_time_s,checkpoint_time_s\r\n")  # as csv writes it
EPOCH_1 = "1,0.05,2.0,30.0,1.5,60.0,1.6,58.0,10.0,0.1,1.0,0.5\r\n"
EPOCH_2 = "2,0.05,1.2,50.0,1.0,70.0,1.1,69.0,12.0,0.3,1.4,\r\n"  # the best: the curve peaks early; checkpoint time unknown
GARBAGE = "3,0.05,1.1,5x.0,0.9,71.0,1.0,70.0,11.0,0.2,1.1,0.1\r\n"     # a cell that is not a number
WIDE = "3,0.05,1.1,52.0,0.9,71.0,1.0,70.0,11.0,0.2,1.1,0.1,7,8\r\n"    # two cells more than the header
EPOCH_4 = "4,0.05,nan,40.0,1.3,65.0,1.2,66.0,11.0,0.2,1.2,0.25\r\n"    # diverged: a nan loss is still a number
NAN_ACC = "5,0.05,1.0,50.0,1.0,nan,1.0,60.0,11.0,0.2,1.2,0.1\r\n"      # val_acc is never nan in a whole row
CUT = "6,0.05,1.0,5"                                             # a kill mid-write: no newline


@pytest.fixture
def run_dir(tmp_path):
    lines = [HEADER, EPOCH_1, EPOCH_2, GARBAGE, WIDE, EPOCH_4, NAN_ACC, CUT]
    (tmp_path / "epochs.csv").write_bytes("".join(lines).encode())
    return tmp_path


def test_the_whole_rows_are_read_as_numbers_and_the_others_are_named_by_line(run_dir):
    rows, problem = read_epochs(run_dir)
    assert [r["epoch"] for r in rows] == [1, 2, 4]
    assert rows[1]["val_acc"] == 70.0 and math.isnan(rows[2]["train_loss"])
    assert problem == "epochs.csv: lines 4, 7, 8 not numbers; line 5 more cells than its header"


def test_the_per_run_numbers_are_computed_from_the_whole_rows_only(run_dir):
    summary = epoch_summary(read_epochs(run_dir)[0], best_epoch=2)
    # timings: the whole rows after the first (epochs 2 and 4); the first epoch's time on its own
    assert summary == {
        "ke_time_s_mean": pytest.approx((0.3 + 0.2) / 2), "epoch_time_s_mean": pytest.approx((12.0 + 11.0) / 2),
        "ke_eval_time_s_mean": pytest.approx((1.4 + 1.2) / 2), "checkpoint_time_s_mean": pytest.approx(0.25),
        "first_epoch_time_s": 10.0, "ke_drop_mean": pytest.approx((2.0 + 1.0 - 1.0) / 3),
        "ke_drop_best": pytest.approx(1.0), "ke_overhead": pytest.approx(1.3 / 11.5),
        "best_val_acc": 70.0, "best_ke_val_acc": 69.0, "last_val_acc": 65.0}


def test_a_best_epoch_without_a_whole_row_has_no_ke_drop(run_dir):
    rows = read_epochs(run_dir)[0]
    assert epoch_summary(rows, best_epoch=3)["ke_drop_best"] is None  # its row was garbage
    assert epoch_summary(rows, best_epoch=None)["ke_drop_best"] is None
    assert epoch_summary([], best_epoch=2) == dict.fromkeys(epoch_summary(rows), None)


def test_results_json_takes_its_epoch_numbers_from_the_same_aggregate(run_dir):
    assert epoch_fields(run_dir) == {"ke_time_s_mean": pytest.approx(0.25), "epoch_time_s_mean": pytest.approx(11.5),
                                     "best_val_acc": 70.0, "best_ke_val_acc": 69.0}


def test_a_warm_up_first_epoch_does_not_enter_the_timing_means_but_is_kept():
    def row(epoch, seconds):
        return {"epoch": epoch, "val_acc": 50.0, "ke_val_acc": 49.0, "epoch_time_s": seconds, "ke_time_s": 0.01,
                "ke_eval_time_s": seconds / 10, "checkpoint_time_s": math.nan}

    warm, equal = epoch_summary([row(1, 14.3), row(2, 6.0), row(3, 5.0)]), epoch_summary([row(1, 5.5), row(2, 6.0),
                                                                                            row(3, 5.0)])
    assert warm["epoch_time_s_mean"] == equal["epoch_time_s_mean"] == pytest.approx(5.5)
    assert warm["ke_overhead"] == equal["ke_overhead"] == pytest.approx(0.1)
    assert (warm["first_epoch_time_s"], equal["first_epoch_time_s"]) == (14.3, 5.5)
    one = epoch_summary([row(1, 14.3)])  # a single epoch is all there is: its own time
    assert one["epoch_time_s_mean"] == one["first_epoch_time_s"] == 14.3
    assert one["checkpoint_time_s_mean"] is None  # nothing recorded in any epoch


def test_a_blank_line_is_no_row_and_no_problem(tmp_path):
    (tmp_path / "epochs.csv").write_bytes((HEADER + EPOCH_1 + "\r\n" + EPOCH_2).encode())
    rows, problem = read_epochs(tmp_path)
    assert ([r["epoch"] for r in rows], problem) == ([1, 2], None)


def test_a_resume_keeps_the_whole_rows_up_to_its_epoch_byte_for_byte(run_dir):
    epoch_log(run_dir).keep_epochs_upto(2)
    assert (run_dir / "epochs.csv").read_bytes() == (HEADER + EPOCH_1 + EPOCH_2).encode()


def test_a_header_cut_short_or_without_the_required_columns_says_so(tmp_path):
    (tmp_path / "epochs.csv").write_text("epoch,lr,train")
    assert read_epochs(tmp_path) == ([], "epochs.csv: no column 'val_acc' in its header")
    (tmp_path / "epochs.csv").write_text("step,loss\n1,0.5\n")
    assert read_epochs(tmp_path) == ([], "epochs.csv: no column 'epoch' in its header")
    (tmp_path / "epochs.csv").write_text("epoch,lr,val_acc\n1,0.1,50.0\n")
    assert read_epochs(tmp_path) == ([], "epochs.csv: no column 'ke_val_acc' in its header")
    (tmp_path / "epochs.csv").unlink()
    assert read_epochs(tmp_path) == ([], None)


def test_a_file_written_before_checkpoint_time_s_keeps_its_rows_when_a_resume_appends_one(tmp_path):
    old_header = "epoch,lr,train_loss,train_acc,val_loss,val_acc,ke_val_loss,ke_val_acc,epoch_time_s,ke_time_s,ke_eval_time_s\r\n"
    (tmp_path / "epochs.csv").write_bytes((old_header + "1,0.05,2.0,30.0,1.5,60.0,1.6,58.0,10.0,0.1,1.0\r\n").encode())
    log = epoch_log(tmp_path)
    log.append({"epoch": 2, "lr": 0.05, "train_loss": 1.2, "train_acc": 50.0, "val_loss": 1.0, "val_acc": 70.0,
                "ke_val_loss": 1.1, "ke_val_acc": 69.0, "epoch_time_s": 12.0, "ke_time_s": 0.3, "ke_eval_time_s": 1.4,
                "checkpoint_time_s": 0.75})
    rows, problem = read_epochs(tmp_path)
    assert problem is None and [r["epoch"] for r in rows] == [1, 2]
    assert math.isnan(rows[0]["checkpoint_time_s"]) and rows[1]["checkpoint_time_s"] == 0.75
    assert (tmp_path / "epochs.csv").read_text().splitlines()[0].endswith(",ke_eval_time_s,checkpoint_time_s")
    assert epoch_summary(rows)["checkpoint_time_s_mean"] == 0.75
