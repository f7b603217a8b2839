"""A gRPC client that knows nothing of Flotilla but what server reflection
tells it: the reflection tests of the api and the provider-adapter run it
(with the venv of scripts/python-client.sh) to prove a third-party tool can
discover and call them.

It speaks the grpc.reflection.v1alpha protocol (the one grpcio-reflection,
and older grpcurl, use): lists the services, fetches the file descriptor of
each (and their imports) into an empty descriptor pool, builds each request
from JSON against those descriptors and calls the method.

Usage: reflection_client.py SPEC_JSON, where SPEC is
  {"target": "host:port", "metadata": [["k", "v"], ...],
   "calls": [{"method": "pkg.Service/Method", "request": {...}}, ...]}
A call may instead carry "raw_request_hex": the request's bytes as sent
(what a buggy or hostile client puts on the wire, such as a string field
that is not UTF-8, which no protobuf library lets one build); and
"stream": true for a server-streaming method, whose responses are read
until the stream ends or fails ("max_responses" stops reading earlier).
Prints one JSON object:
  {"services": [...], "files": {"<service>": "<file>"},
   "calls": [{"code": "OK", "details": "", "response": {...},
              "responses": [...] (streams), "metadata": {...}}, ...]}
"""

import json
import sys

import grpc
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)


def metadata_dict(pairs):
    return {k: v for k, v in (pairs or ()) if isinstance(v, str)}


def main():
    spec = json.loads(sys.argv[1])
    metadata = [tuple(kv) for kv in spec.get("metadata", [])]
    with grpc.insecure_channel(spec["target"]) as channel:
        grpc.channel_ready_future(channel).result(timeout=20)
        db = ProtoReflectionDescriptorDatabase(channel)
        # An empty pool: every descriptor comes from the server.
        pool = descriptor_pool.DescriptorPool(db)
        services = list(db.get_services())
        files = {}
        for name in services:
            files[name] = pool.FindServiceByName(name).file.name

        answers = []
        for call in spec.get("calls", []):
            service_name, method_name = call["method"].split("/")
            method = pool.FindServiceByName(service_name).FindMethodByName(method_name)
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            if "raw_request_hex" in call:
                request = bytes.fromhex(call["raw_request_hex"])
                serializer = None  # the bytes go out as they are
            else:
                request = json_format.ParseDict(call.get("request", {}), request_class())
                serializer = request_class.SerializeToString
            if call.get("stream"):
                answers.append(
                    read_stream(channel, call, request, serializer, response_class, metadata)
                )
                continue
            stub = channel.unary_unary(
                "/" + call["method"],
                request_serializer=serializer,
                response_deserializer=response_class.FromString,
            )
            try:
                response, rpc = stub.with_call(request, metadata=metadata, timeout=20)
                answers.append(
                    {
                        "code": "OK",
                        "details": "",
                        "response": json_format.MessageToDict(
                            response, preserving_proto_field_name=True
                        ),
                        "metadata": metadata_dict(rpc.initial_metadata()),
                    }
                )
            except grpc.RpcError as e:
                answers.append(
                    {
                        "code": e.code().name,
                        "details": e.details() or "",
                        "response": None,
                        "metadata": {
                            **metadata_dict(e.initial_metadata()),
                            **metadata_dict(e.trailing_metadata()),
                        },
                    }
                )
    json.dump({"services": services, "files": files, "calls": answers}, sys.stdout)


def read_stream(channel, call, request, serializer, response_class, metadata):
    """A server-streaming call: its responses until it ends or fails."""
    stub = channel.unary_stream(
        "/" + call["method"],
        request_serializer=serializer,
        response_deserializer=response_class.FromString,
    )
    responses = []
    rpc = stub(request, metadata=metadata, timeout=20)
    try:
        for response in rpc:
            responses.append(
                json_format.MessageToDict(response, preserving_proto_field_name=True)
            )
            if len(responses) >= call.get("max_responses", float("inf")):
                rpc.cancel()
                break
        code, details = "OK", ""
    except grpc.RpcError as e:
        code, details = e.code().name, e.details() or ""
    return {
        "code": code,
        "details": details,
        "response": None,
        "responses": responses,
        "metadata": {
            **metadata_dict(rpc.initial_metadata()),
            **metadata_dict(rpc.trailing_metadata()),
        },
    }


if __name__ == "__main__":
    main()
