"""Benchmark clients of ``bench.serve``: single requests over REST and gRPC, and closed-loop throughput.

The load generator shares the machine with the server, so clients are kept light:
each request body is encoded once, every client thread keeps one persistent connection.
"""

from __future__ import annotations

import base64
import json
import threading
import time

from bench.serve_process import MODEL_NAME

#: A refused request (503) is sent again after this pause in the throughput phases.
RESEND_AFTER_S = 0.1


class Refused(Exception):
    """The server answered 503 (overloaded); ``retry_after`` is its Retry-After in seconds."""

    def __init__(self, retry_after: float):
        super().__init__(f"503, retry after {retry_after} s")
        self.retry_after = retry_after


def image_body(images: list[bytes], outputs: tuple[str, ...] = ()) -> bytes:
    """The v2 JSON request for ``images`` (base64), encoded once; ``outputs``: the outputs it names (none: defaults)."""
    body: dict = {
        "inputs": [
            {
                "name": "image",
                "datatype": "BYTES",
                "shape": [len(images)],
                "data": [base64.b64encode(i).decode() for i in images],
            }
        ]
    }
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]
    return json.dumps(body).encode()


class RestClient:
    """One persistent connection posting a prepared v2 JSON body."""

    def __init__(self, url: str, image: bytes | None = None, outputs: tuple[str, ...] = ()):
        import requests

        self.url = f"{url}/v2/models/{MODEL_NAME}/infer"
        self.body = image_body([image], outputs) if image is not None else b""
        self.session = requests.Session()
        self.headers = {"Content-Type": "application/json"}

    def post(self, body: bytes, timeout: float = 120) -> tuple[int, dict, float | None]:
        """(status, headers, first probability or None) of one request with ``body``."""
        reply = self.session.post(self.url, data=body, headers=self.headers, timeout=timeout)
        if reply.status_code != 200:
            return reply.status_code, dict(reply.headers), None
        outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
        return 200, dict(reply.headers), float(outputs["probability"][0])

    def probability(self, image: bytes) -> float:
        """The server's probability for ``image`` alone."""
        status, _, probability = self.post(image_body([image]))
        if status != 200 or probability is None:
            raise RuntimeError(f"REST infer answered {status}")
        return probability

    def infer(self) -> float:
        status, headers, probability = self.post(self.body)
        if status == 503:
            raise Refused(float(headers.get("retry-after", 1)))
        if status != 200 or probability is None:
            raise RuntimeError(f"REST infer answered {status}")
        return probability

    def close(self) -> None:
        self.session.close()


class GrpcClient:
    """A raw ModelInfer stub on one channel; the request (raw image bytes) is serialized once."""

    METHOD = "/inference.GRPCInferenceService/ModelInfer"

    def __init__(self, target: str, image: bytes):
        import grpc
        from tritonclient.grpc import service_pb2  # the v2 protos, without importing kserve

        request = service_pb2.ModelInferRequest(model_name=MODEL_NAME)
        request.inputs.add(name="image", datatype="BYTES", shape=[1])
        request.raw_input_contents.append(len(image).to_bytes(4, "little") + image)
        self.body = request.SerializeToString()
        self.channel = grpc.insecure_channel(target)
        self.call = self.channel.unary_unary(
            self.METHOD, request_serializer=None, response_deserializer=service_pb2.ModelInferResponse.FromString
        )

    def infer(self) -> float:
        import numpy as np

        reply = self.call(self.body, timeout=120)
        index = [o.name for o in reply.outputs].index("probability")
        return float(np.frombuffer(reply.raw_output_contents[index], dtype="<f4")[0])

    def close(self) -> None:
        self.channel.close()


def interleaved_latency(clients: dict, warmup: int, n: int) -> tuple[dict[str, list[float]], dict[str, float]]:
    """``n`` sequential rounds, each one request per client in turn (so background load hits them alike).

    Returns each client's latencies in seconds and the probability it returned.
    """
    probability = {}
    for name, client in clients.items():
        for _ in range(warmup):
            probability[name] = client.infer()
    times: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(n):
        for name, client in clients.items():
            start = time.perf_counter()
            probability[name] = client.infer()
            times[name].append(time.perf_counter() - start)
    return times, probability


def call_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's chest_ct_model_call_images histogram (images per model call)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    values = {"chest_ct_model_call_images_sum": 0.0, "chest_ct_model_call_images_count": 0.0}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name in values and sample.labels.get("model_name") == MODEL_NAME:
                values[sample.name] = sample.value
    return values["chest_ct_model_call_images_sum"], values["chest_ct_model_call_images_count"]


def rejected_by_reason(url: str) -> dict[str, float]:
    """The server's chest_ct_requests_rejected_total by reason (503s since it started)."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(requests.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "chest_ct_requests_rejected_total" and sample.labels.get("model_name") == MODEL_NAME:
                found[sample.labels["reason"]] = sample.value
    return found


def throughput(url: str, image: bytes, clients: int, duration: float, max_per_client: int) -> dict:
    """``clients`` threads sending single-image requests back to back for ``duration`` seconds (bounded count).

    A refused request (503) is sent again after RESEND_AFTER_S. Steady-state images/s: completions after
    every client has had its first answer, up to the last one (clients that never got one are counted).
    """
    sessions = [RestClient(url, image) for _ in range(clients)]
    done: list[list[float]] = [[] for _ in range(clients)]
    refused = [0] * clients
    errors: list[BaseException] = []
    barrier = threading.Barrier(clients + 1)
    before = call_stats(url)

    def run(i: int) -> None:
        barrier.wait()
        deadline = time.perf_counter() + duration
        try:
            while time.perf_counter() < deadline and len(done[i]) < max_per_client:
                try:
                    sessions[i].infer()
                except Refused:
                    refused[i] += 1
                    time.sleep(RESEND_AFTER_S)
                    continue
                done[i].append(time.perf_counter())
        except BaseException as exc:  # noqa: BLE001  (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join(duration + 180)
    for s in sessions:
        s.close()
    if errors:
        raise RuntimeError(f"{clients} clients: {errors[0]!r}")
    if any(t.is_alive() for t in threads):
        raise RuntimeError(f"{clients} clients: requests still running long after the deadline")
    answered = [d for d in done if d]
    if not answered:
        raise RuntimeError(f"{clients} clients: no answer within {duration:.0f} s")
    after = call_stats(url)
    t_a = max(d[0] for d in answered)  # every client that got an answer has had its first
    stamps = sorted(x for d in answered for x in d)
    t_b = stamps[-1]
    counted = sum(1 for x in stamps if t_a < x <= t_b)
    ips = counted / (t_b - t_a) if counted and t_b > t_a else len(stamps) / (t_b - start)
    calls = after[1] - before[1]
    return {
        "ips": ips,
        "requests": len(stamps),
        "seconds": t_b - start,
        "refused": sum(refused),
        "unanswered_clients": clients - len(answered),
        "images_per_call": (after[0] - before[0]) / calls if calls else float("nan"),
    }
