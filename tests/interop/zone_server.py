"""A tiny authoritative DNS server for the DNS registry tests (dnslib).

Serves the records of a JSON zone file, read again on every query so that a
test changes the zone by rewriting the file:

  {"fail": false,
   "records": [
     {"name": "greeter.svc.test", "type": "A", "value": "127.0.0.2", "ttl": 1},
     {"name": "_grpc._tcp.web.svc.test", "type": "SRV", "ttl": 1,
      "priority": 0, "weight": 1, "port": 5000, "target": "host.svc.test"}]}

"fail": true answers SERVFAIL to everything. A name with no record at all
gets NXDOMAIN; a name with records of other types, an empty answer. SRV
answers carry the targets' A/AAAA records in the additional section.
Listens on UDP and TCP of 127.0.0.1:--port (0: any free port) and prints
"LISTENING <port>"; each query is logged to stderr as "QUERY <name> <type>".
"""

import argparse
import json
import sys
import time

from dnslib import AAAA, QTYPE, RCODE, RR, SRV, A
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class ZoneResolver(BaseResolver):
    def __init__(self, path):
        self.path = path

    def zone(self):
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"fail": True, "records": []}

    def resolve(self, request, handler):
        reply = request.reply()
        qname = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        print("QUERY %s %s" % (qname, qtype), file=sys.stderr, flush=True)
        zone = self.zone()
        if zone.get("fail"):
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        records = zone.get("records", [])
        named = [r for r in records if r["name"].rstrip(".").lower() == qname]
        if not named:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for r in named:
            if r["type"] != qtype:
                continue
            reply.add_answer(self.rr(r))
            if qtype == "SRV":
                target = r["target"].rstrip(".").lower()
                for t in records:
                    if t["name"].rstrip(".").lower() == target and t["type"] in ("A", "AAAA"):
                        reply.add_ar(self.rr(t))
        return reply

    @staticmethod
    def rr(r):
        name = r["name"].rstrip(".") + "."
        ttl = int(r.get("ttl", 1))
        if r["type"] == "A":
            return RR(name, QTYPE.A, ttl=ttl, rdata=A(r["value"]))
        if r["type"] == "AAAA":
            return RR(name, QTYPE.AAAA, ttl=ttl, rdata=AAAA(r["value"]))
        if r["type"] == "SRV":
            target = r["target"].rstrip(".") + "."
            return RR(name, QTYPE.SRV, ttl=ttl,
                      rdata=SRV(int(r["priority"]), int(r["weight"]), int(r["port"]), target))
        raise ValueError("unsupported record type %s" % r["type"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--zone", required=True)
    p.add_argument("--port", type=int, default=0)
    args = p.parse_args()
    logger = DNSLogger("-request,-reply,-truncated,-error", logf=lambda line: None)
    resolver = ZoneResolver(args.zone)
    udp = DNSServer(resolver, address="127.0.0.1", port=args.port, logger=logger)
    port = udp.server.server_address[1]
    tcp = DNSServer(resolver, address="127.0.0.1", port=port, tcp=True, logger=logger)
    udp.start_thread()
    tcp.start_thread()
    print("LISTENING %d" % port, flush=True)
    while udp.isAlive():
        time.sleep(0.5)


if __name__ == "__main__":
    main()
