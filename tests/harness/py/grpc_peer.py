"""A gRPC server or client (python3-grpcio, no generated code: raw bytes
through a generic handler) for the HTTP layer's gRPC test.

usage: grpc_peer.py serve ADDR PORT | grpc_peer.py call TARGET NAME
The method /test.Greeter/Hello answers "hello NAME"; NAME "fail" gets
status NOT_FOUND (5) in trailers.
"""
import sys
from concurrent import futures

import grpc


def hello(request, context):
    name = request.decode()
    if name == "fail":
        context.abort(grpc.StatusCode.NOT_FOUND, "no such greeting")
    return ("hello " + name).encode()


if sys.argv[1] == "serve":
    handler = grpc.method_handlers_generic_handler(
        "test.Greeter",
        {"Hello": grpc.unary_unary_rpc_method_handler(hello)},
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), handlers=[handler])
    server.add_insecure_port(f"{sys.argv[2]}:{sys.argv[3]}")
    server.start()
    server.wait_for_termination()
else:
    with grpc.insecure_channel(sys.argv[2]) as channel:
        call = channel.unary_unary("/test.Greeter/Hello")
        try:
            print(call(sys.argv[3].encode(), timeout=10).decode())
        except grpc.RpcError as e:
            print("status", e.code().value[0])
