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
    args = p.parse_args()

    bootstrap = {
        "xds_servers": [{"server_uri": args.lb, "channel_creds": [{"type": "insecure"}], "server_features": ["xds_v3"]}],
        "node": {"id": args.node_id, "locality": {"zone": args.zone}},
    }
    os.environ["GRPC_XDS_BOOTSTRAP_CONFIG"] = json.dumps(bootstrap)
    import grpc  # after the bootstrap is set: C-core reads it at channel creation

    channel = grpc.insecure_channel("xds:///" + args.name)
    say_hello = channel.unary_unary("/helloworld.Greeter/SayHello")

    if args.expect_failure:
        start = time.time()
        try:
            say_hello(hello_codec.encode("probe"), timeout=args.ready_timeout, wait_for_ready=False)
            print(json.dumps({"error": "the call succeeded"}))
        except grpc.RpcError as e:
            print(json.dumps({"failed_after": time.time() - start, "code": str(e.code()), "details": e.details()}))
        return 0

    deadline = time.time() + args.ready_timeout
    last_error = None
    while time.time() < deadline:
        try:
            say_hello(hello_codec.encode("warmup"), timeout=2, wait_for_ready=True)
            break
        except grpc.RpcError as e:
            last_error = "%s: %s" % (e.code(), e.details())
            time.sleep(0.2)
    else:
        print(json.dumps({"error": "never became ready: %s" % last_error}))
        return 1

    per_backend, failures = {}, []
    if args.duration > 0:
        end = time.time() + args.duration
        schedule = iter(lambda: time.time() < end, False)
    else:
        schedule = (True for _ in range(args.calls))
    calls = 0
    for i, _ in enumerate(schedule):
        if args.duration > 0:
            time.sleep(args.interval)
        calls += 1
        try:
            raw = say_hello(hello_codec.encode("call-%d" % i), timeout=5)
        except grpc.RpcError as e:
            failures.append("%s %s: %s" % (time.strftime("%H:%M:%S"), e.code(), e.details()))
            continue
        backend = hello_codec.decode(raw).rsplit(" from ", 1)[-1]
        per_backend[backend] = per_backend.get(backend, 0) + 1
    time.sleep(args.linger)
    print(json.dumps({"calls": calls, "per_backend": per_backend, "failures": failures, "grpc": grpc.__version__}))
    channel.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
