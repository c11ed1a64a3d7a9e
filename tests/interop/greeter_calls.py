"""What the stock Python clients of the interop tests share: waiting for the
first call to succeed, and the schedule of calls (N as fast as they go, or
one every interval for a duration)."""

import time

import grpc

import hello_codec


def warm_up(say_hello, seconds):
    """Calls until one succeeds (wait_for_ready); None, or the last error
    when none did within `seconds`."""
    deadline = time.time() + seconds
    last_error = "no call tried"
    while time.time() < deadline:
        try:
            say_hello(hello_codec.encode("warmup"), timeout=2, wait_for_ready=True)
            return None
        except grpc.RpcError as e:
            last_error = "%s: %s" % (e.code(), e.details())
            time.sleep(0.2)
    return last_error


def schedule(calls, duration, interval):
    """Call numbers: `calls` of them at once, or with `duration` > 0 one
    every `interval` seconds until `duration` has passed."""
    if duration <= 0:
        yield from range(calls)
        return
    end = time.time() + duration
    i = 0
    while time.time() < end:
        time.sleep(interval)
        yield i
        i += 1


def failure(e):
    """A failed call, with the time it failed."""
    return "%s %s: %s" % (time.strftime("%H:%M:%S"), e.code(), e.details())
