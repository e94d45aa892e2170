"""The engine's outbox: outputs from the step thread reach each consumer's
loop in posting order, one wake-up per loop per flush, and a closed loop is
reported as a gone consumer."""

import asyncio
import threading

from services.gpu_agent.engine.outbox import Outbox


def test_outputs_arrive_in_order_after_a_flush_from_another_thread():
    outbox = Outbox()

    async def consume():
        loop = asyncio.get_running_loop()
        first, second = asyncio.Queue(), asyncio.Queue()
        woken = []
        real_call = loop.call_soon_threadsafe

        def counting_call(callback, *args):
            woken.append(callback)
            return real_call(callback, *args)

        loop.call_soon_threadsafe = counting_call

        def step_thread():
            for i in range(3):
                assert outbox.post(loop, first.put_nowait, f"a{i}")
                assert outbox.post(loop, second.put_nowait, f"b{i}")
            outbox.flush()

        thread = threading.Thread(target=step_thread)
        thread.start()
        got_first = [await asyncio.wait_for(first.get(), 5) for _ in range(3)]
        got_second = [await asyncio.wait_for(second.get(), 5) for _ in range(3)]
        thread.join()
        return got_first, got_second, woken

    got_first, got_second, woken = asyncio.run(consume())
    assert got_first == ["a0", "a1", "a2"]
    assert got_second == ["b0", "b1", "b2"]
    assert len(woken) == 1  # six outputs, one wake-up of their loop


def test_nothing_is_handed_over_before_a_flush():
    outbox = Outbox()

    async def run():
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        outbox.post(loop, queue.put_nowait, "x")
        await asyncio.sleep(0.05)
        before = queue.qsize()
        outbox.flush()
        return before, await asyncio.wait_for(queue.get(), 5)

    assert asyncio.run(run()) == (0, "x")


def test_a_closed_loop_means_the_consumer_is_gone():
    outbox = Outbox()
    loop = asyncio.new_event_loop()
    loop.close()
    assert outbox.post(loop, print, "lost") is False
    outbox.flush()  # nothing pending for it: no error


def test_a_loop_closed_between_post_and_flush_loses_only_its_own_outputs():
    outbox = Outbox()
    closing = asyncio.new_event_loop()
    assert outbox.post(closing, print, "lost")
    closing.close()

    async def run():
        loop = asyncio.get_running_loop()
        queue = asyncio.Queue()
        outbox.post(loop, queue.put_nowait, "kept")
        outbox.flush()
        return await asyncio.wait_for(queue.get(), 5)

    assert asyncio.run(run()) == "kept"
