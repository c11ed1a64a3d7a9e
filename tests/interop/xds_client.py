"""Stock gRPC C-core client (Python grpcio) balancing through the LB's xDS.

The bootstrap (GRPC_XDS_BOOTSTRAP_CONFIG) names the LB as the xDS server;
the channel dials xds:///<name>, so C-core asks the LB for the Listener,
RouteConfiguration, Cluster and ClusterLoadAssignment, and calls backends
directly. Makes calls to helloworld.Greeter/SayHello and prints one JSON
summary: calls per backend, failures (with the time they happened).
"""

import argparse
import json
import os
import sys
import time

import hello_codec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lb", required=True, help="the xDS server_uri: host:port of an LB, or ipv4:a:p,b:q for replicas")
    p.add_argument("--name", default="greeter")
    p.add_argument("--node-id", default="grpcio-client")
    p.add_argument("--zone", default="")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--ready-timeout", type=float, default=20.0)
    p.add_argument("--duration", type=float, default=0.0, help="call for this many seconds (instead of --calls)")
    p.add_argument("--interval", type=float, default=0.02, help="seconds between calls with --duration")
    p.add_argument("--linger", type=float, default=0.0, help="seconds to keep the channel open after the calls")
    p.add_argument("--expect-failure", action="store_true", help="time how long until the first call fails")
    p.add_argument("--load-seconds", type=float, default=0.0, help="closed-loop load for this long; prints calls/s and latency")
    p.add_argument("--concurrency", type=int, default=32, help="calls in flight with --load-seconds")
    p.add_argument("--target", default="", help="dial this instead of xds:///<name> (e.g. a proxy's host:port)")
    p.add_argument("--events", action="store_true", help="add every call to the summary: [unix time, backend, ok] (a failed call's backend from its details)")
    args = p.parse_args()

    bootstrap = {
        "xds_servers": [{"server_uri": args.lb, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
        "node": {"id": args.node_id, "locality": {"zone": args.zone}},
    }
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(bootstrap)
    import grpc  # after the bootstrap is set: C-core reads it at channel creation

    import greeter_calls

    channel = grpc.insecure_channel(args.target or "xds:///" + args.name)
    say_hello = channel.unary_unary("/helloworld.Greeter/SayHello")

    if args.expect_failure:
        start = time.time()
        try:
            say_hello(hello_codec.encode("probe"), timeout=args.ready_timeout, wait_for_ready=False)
            print(json.dumps({"error": "the call succeeded"}))
        except grpc.RpcError as e:
            print(json.dumps({"failed_after": time.time() - start, "code": str(e.code()), "details": e.details()}))
        return 0

    error = greeter_calls.warm_up(say_hello, args.ready_timeout)
    if error:
        print(json.dumps({"error": "never became ready: %s" % error}))
        return 1

    if args.load_seconds > 0:
        print(json.dumps(load(say_hello, args.load_seconds, args.concurrency)))
        channel.close()
        return 0

    per_backend, failures, events = {}, [], []
    calls = 0
    for i in greeter_calls.schedule(args.calls, args.duration, args.interval):
        calls += 1
        at = round(time.time(), 3)
        try:
            raw = say_hello(hello_codec.encode("call-%d" % i), timeout=5)
        except grpc.RpcError as e:
            failures.append(greeter_calls.failure(e))
            if args.events:
                events.append([at, (e.details() or "").rsplit(" at ", 1)[-1], 0])
            continue
        backend = hello_codec.decode(raw).rsplit(" from ", 1)[-1]
        per_backend[backend] = per_backend.get(backend, 0) + 1
        if args.events:
            events.append([at, backend, 1])
    time.sleep(args.linger)
    summary = {"calls": calls, "per_backend": per_backend, "failures": failures, "grpc": grpc.__version__}
    if args.events:
        summary["events"] = events
    print(json.dumps(summary))
    channel.close()
    return 0


def load(say_hello, seconds, concurrency):
    """Closed loop: `concurrency` calls in flight (futures), for `seconds`."""
    import threading

    lock = threading.Lock()
    done = threading.Event()
    latencies, failures = [], [0]
    end = time.time() + seconds
    request = hello_codec.encode("load")

    def start():
        t0 = time.perf_counter()
        future = say_hello.future(request, timeout=5)
        future.add_done_callback(lambda f: finished(f, t0))

    def finished(future, t0):
        elapsed = time.perf_counter() - t0
        with lock:
            if future.exception() is None:
                latencies.append(elapsed)
            else:
                failures[0] += 1
        if time.time() < end:
            start()
        elif threading.active_count() and len(latencies) + failures[0] > 0:
            done.set()

    t_start = time.time()
    for _ in range(concurrency):
        start()
    done.wait(seconds + 10)
    wall = time.time() - t_start
    time.sleep(0.5)  # the last calls in flight
    with lock:
        lat = sorted(latencies)
    pct = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6 if lat else float("nan")
    return {"calls_per_s": len(lat) / wall, "p50_us": pct(0.5), "p99_us": pct(0.99), "failures": failures[0]}


if __name__ == "__main__":
    sys.exit(main())
