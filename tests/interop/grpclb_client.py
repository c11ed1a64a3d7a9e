"""Stock gRPC C-core client (Python grpcio) balancing through the LB.

Runs a tiny DNS server (dnslib) on loopback that answers:
  SRV  _grpclb._tcp.<host>  -> lb.<host>:<lb port>   (where the balancer is)
  A    lb.<host>            -> 127.0.0.1
  A    <host>               -> 127.0.0.1           (fallback address)
then dials dns://127.0.0.1:<dns port>/<host> with SRV queries enabled and
the grpclb policy selected, makes N calls to helloworld.Greeter/SayHello,
and prints a JSON summary: calls per backend, the lb-token each backend
echoed, failures.
"""

import argparse
import json
import sys
import time

import grpc
from dnslib import QTYPE, RR, A, SRV
from dnslib.server import BaseResolver, DNSLogger, DNSServer

import greeter_calls
import hello_codec


class Resolver(BaseResolver):
    def __init__(self, host, lb_port):
        self.host = host.rstrip(".").lower()
        self.lb_host = "lb." + self.host
        self.lb_port = lb_port

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        if qtype == "SRV" and qname == "_grpclb._tcp." + self.host:
            reply.add_answer(RR(request.q.qname, QTYPE.SRV, ttl=30, rdata=SRV(0, 0, self.lb_port, self.lb_host + ".")))
            reply.add_ar(RR(self.lb_host + ".", QTYPE.A, ttl=30, rdata=A("127.0.0.1")))
        elif qtype == "A" and qname in (self.host, self.lb_host):
            reply.add_answer(RR(request.q.qname, QTYPE.A, ttl=30, rdata=A("127.0.0.1")))
        return reply


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--lb-port", type=int, required=True)
    p.add_argument("--host", default="greeter.svc.test")
    p.add_argument("--calls", type=int, default=300)
    p.add_argument("--ready-timeout", type=float, default=20.0)
    p.add_argument("--linger", type=float, default=0.0, help="seconds to keep the channel open after the calls")
    p.add_argument("--duration", type=float, default=0.0, help="call for this many seconds (instead of --calls)")
    p.add_argument("--interval", type=float, default=0.05, help="seconds between calls with --duration")
    args = p.parse_args()

    # stdout carries only the JSON summary; DNS queries are logged to stderr.
    logger = DNSLogger("request", logf=lambda line: print(line, file=sys.stderr))
    # UDP and TCP on one port: the kernel picks a free UDP port, whose TCP
    # twin may be taken by an outgoing connection; then try another.
    for attempt in range(20):
        udp = DNSServer(Resolver(args.host, args.lb_port), address="127.0.0.1", port=0, logger=logger)
        dns_port = udp.server.server_address[1]
        try:
            tcp = DNSServer(Resolver(args.host, args.lb_port), address="127.0.0.1", port=dns_port, tcp=True, logger=logger)
            break
        except OSError:
            udp.server.server_close()
            if attempt == 19:
                raise
    udp.start_thread()
    tcp.start_thread()

    target = "dns://127.0.0.1:%d/%s" % (dns_port, args.host)
    options = [
        ("grpc.dns_enable_srv_queries", 1),
        ("grpc.service_config", json.dumps({"loadBalancingConfig": [{"grpclb": {}}]})),
    ]
    channel = grpc.insecure_channel(target, options=options)
    say_hello = channel.unary_unary("/helloworld.Greeter/SayHello")

    # Wait until the first call succeeds through the LB (the channel resolves
    # SRV, opens the BalanceLoad stream and connects to backends).
    error = greeter_calls.warm_up(say_hello, args.ready_timeout)
    if error:
        print(json.dumps({"error": "never became ready: %s" % error}))
        return 1

    per_backend, tokens, failures = {}, {}, []
    calls = 0
    for i in greeter_calls.schedule(args.calls, args.duration, args.interval):
        calls += 1
        try:
            raw, call = say_hello.with_call(hello_codec.encode("call-%d" % i), timeout=5)
        except grpc.RpcError as e:
            failures.append(greeter_calls.failure(e))
            continue
        backend = hello_codec.decode(raw).rsplit(" from ", 1)[-1]
        per_backend[backend] = per_backend.get(backend, 0) + 1
        md = dict(call.initial_metadata())
        tokens[backend] = md.get("x-lb-token", "")
    time.sleep(args.linger)  # lets the channel send its client stats
    print(json.dumps({"calls": calls, "per_backend": per_backend, "tokens": tokens, "failures": failures, "grpc": grpc.__version__}))
    channel.close()
    udp.stop()
    tcp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
