"""A backend on the stock gRPC C-core server (Python grpcio), default settings.

Serves helloworld.Greeter/SayHello (answering "Hello <name> from <addr>", as
the project's greeter does, so tests can tell backends apart) and the stock
health service of grpcio-health-checking (HealthServicer, whole server
SERVING). Nothing about keep-alive is configured: the server enforces
C-core's defaults (grpc.http2.min_ping_interval_without_data_ms 5 min,
grpc.http2.max_ping_strikes 2), which is the point.

Listens on 127.0.0.1:--port (0: any free port) and prints "LISTENING <port>"
once serving. SIGTERM sets health NOT_SERVING, waits --grace seconds, then
stops (the graceful stop of scenario 2).
"""

import argparse
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import hello_codec


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--grace", type=float, default=1.0)
    args = p.parse_args()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    port = server.add_insecure_port("127.0.0.1:%d" % args.port)
    addr = "127.0.0.1:%d" % port

    def say_hello(request, context):
        return "Hello %s from %s" % (request, addr)

    handler = grpc.method_handlers_generic_handler(
        "helloworld.Greeter",
        {
            "SayHello": grpc.unary_unary_rpc_method_handler(
                say_hello,
                request_deserializer=hello_codec.decode,
                response_serializer=hello_codec.encode,
            )
        },
    )
    server.add_generic_rpc_handlers((handler,))
    healthy = health.HealthServicer()
    healthy.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(healthy, server)
    server.start()

    stop = threading.Event()

    def on_term(*_):
        healthy.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        stop.set()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print("LISTENING %d" % port, flush=True)
    stop.wait()
    time.sleep(args.grace)  # clients see NOT_SERVING before the port closes
    server.stop(args.grace).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
