"""The trainer's resume point when batches are drawn out of order (services.trainer_input.Progress)."""

from apmae.train import shuffle_block
from services.trainer_input import Pending, Progress


def item(p: int, o: int) -> Pending:
    return Pending(p, o, f"{p}:{o}", None)


def test_watermark_is_the_oldest_untrained_read_and_trained_offsets_above_it_are_kept():
    prog = Progress({0: 10, 1: 0}, {})
    for o in range(10, 16):
        prog.on_read(0, o, trainable=True)
    prog.on_read(0, 16, trainable=False)  # a dead letter: read, never pending
    prog.on_read(1, 0, trainable=True)
    prog.on_trained([item(0, 12), item(0, 14), item(1, 0)])
    low, above = prog.state()
    assert low == {0: 10, 1: 1}  # 10 is still pending; partition 1 has nothing pending
    assert above == {0: [12, 14]}
    prog.on_trained([item(0, 10), item(0, 11)])
    low, above = prog.state()
    assert low == {0: 13, 1: 1} and above == {0: [14]}  # what the watermark passed is forgotten
    prog.on_trained([item(0, 13), item(0, 15)])
    assert prog.state() == ({0: 17, 1: 1}, {})  # everything read is trained: resume after the dead letter


def test_a_resume_point_replays_exactly_the_untrained_patterns():
    """Train a shuffled block partly, take the resume point, and check that reading from the
    watermark and skipping the offsets above it leaves exactly the untrained patterns."""
    prog = Progress({0: 0, 1: 0}, {})
    block = [item(p, o) for p in (0, 1) for o in range(20)]
    for i in block:
        prog.on_read(i.partition, i.offset, trainable=True)
    order = shuffle_block(block, seed=3, block=0)
    assert order != block and sorted(order, key=lambda i: (i.partition, i.offset)) == block
    trained = order[:23]
    prog.on_trained(trained)
    low, above = prog.state()
    replay = [i for i in block if i.offset >= low[i.partition] and i.offset not in above.get(i.partition, [])]
    assert {(i.partition, i.offset) for i in replay} == {(i.partition, i.offset) for i in order[23:]}


def test_shuffle_block_is_repeatable_per_seed_and_block():
    xs = list(range(100))
    assert shuffle_block(xs, 1, 0) == shuffle_block(xs, 1, 0)
    assert shuffle_block(xs, 1, 0) != shuffle_block(xs, 1, 1)
