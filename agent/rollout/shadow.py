"""Shadow validation: replay the client requests of a captured pcap against blue and green.

Each captured request is sent to both (alternating which goes first, so warm caches and
connection reuse favour neither), responses are compared (status and body digest) and the paired
latencies judged with the Wilcoxon signed-rank test (scipy) on green - blue.
"""

from __future__ import annotations

import hashlib
import http.client
import math
import time
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from core.errors import BadInput
from agent.rollout.plan import ShadowSettings

HTTP_METHODS = (b"GET ", b"POST ", b"PUT ", b"DELETE ", b"HEAD ", b"PATCH ", b"OPTIONS ")
HOP_BY_HOP = {"connection", "keep-alive", "host", "content-length", "transfer-encoding", "proxy-connection"}


@dataclass
class CapturedRequest:
    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes


def split_requests(stream: bytes) -> list[CapturedRequest]:
    """HTTP/1.x requests from one client->server byte stream (Content-Length bodies only;
    chunked request bodies are rare from trading clients and end the parse)."""
    requests = []
    position = 0
    while position < len(stream):
        end = stream.find(b"\r\n\r\n", position)
        if end < 0:
            break
        head = stream[position:end].decode("latin-1").split("\r\n")
        try:
            method, target, _ = head[0].split(" ", 2)
        except ValueError:
            break
        headers = []
        length = 0
        chunked = False
        for line in head[1:]:
            name, _, value = line.partition(":")
            name, value = name.strip(), value.strip()
            if name.lower() == "content-length":
                length = int(value) if value.isdigit() else 0
            if name.lower() == "transfer-encoding" and "chunked" in value.lower():
                chunked = True
            headers.append((name, value))
        body_start = end + 4
        body = stream[body_start:body_start + length]
        requests.append(CapturedRequest(method, target, headers, body))
        if chunked:
            break
        position = body_start + length
    return requests


def pcap_requests(path, server_port: int | None = None, limit: int = 1000) -> list[CapturedRequest]:
    """Client requests from a pcap, flow by flow, TCP payload reassembled by sequence number."""
    from scapy.all import IP, TCP, IPv6, PcapReader  # heavy and optional: imported on use

    segments: dict[tuple, dict[int, bytes]] = {}
    try:
        reader = PcapReader(str(path))
    except Exception as error:  # scapy raises bare Scapy_Exception on a bad file
        raise BadInput(f"validate.shadow.pcap {path}: cannot read ({error})") from None
    with reader:
        for packet in reader:
            if TCP not in packet:
                continue
            layer = packet[IP] if IP in packet else (packet[IPv6] if IPv6 in packet else None)
            if layer is None:
                continue
            tcp = packet[TCP]
            payload = bytes(tcp.payload)
            if not payload:
                continue
            if server_port is not None and tcp.dport != server_port:
                continue
            flow = (layer.src, tcp.sport, layer.dst, tcp.dport)
            if flow not in segments and not payload.startswith(HTTP_METHODS):
                continue  # server->client data, or a flow whose start was not captured
            segments.setdefault(flow, {}).setdefault(tcp.seq, payload)  # first copy wins over retransmits
    requests = []
    for flow in segments.values():
        stream = b"".join(flow[seq] for seq in sorted(flow))
        requests += split_requests(stream)
        if len(requests) >= limit:
            break
    return requests[:limit]


class Replayer:
    def __init__(self, url: str, timeout_s: float):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.timeout_s = timeout_s
        self.connection: http.client.HTTPConnection | None = None

    def send(self, request: CapturedRequest) -> tuple[int, str, int]:
        """(status, body digest, latency_ns); status 0 when the request failed."""
        headers = {name: value for name, value in request.headers if name.lower() not in HOP_BY_HOP}
        for _attempt in (0, 1):  # one retry: a keep-alive connection the server closed meanwhile
            if self.connection is None:
                self.connection = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout_s)
            started = time.perf_counter_ns()
            try:
                self.connection.request(request.method, request.target, body=request.body or None,
                                        headers=headers)
                response = self.connection.getresponse()
                body = response.read()
                latency = time.perf_counter_ns() - started
                if response.will_close:
                    self.connection.close()
                    self.connection = None
                return response.status, hashlib.sha256(body).hexdigest(), latency
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
        return 0, "", 0


def paired_latency_verdict(blue_ns: np.ndarray, green_ns: np.ndarray, threshold_pct: float,
                           confidence: float) -> tuple[str, str, float]:
    """(pass|fail|inconclusive, reason, median paired difference in %)."""
    from scipy.stats import wilcoxon

    if blue_ns.size < 10:
        return "inconclusive", f"{blue_ns.size} paired requests, need 10", math.nan
    differences = green_ns - blue_ns
    scale = float(np.median(blue_ns)) or 1.0
    median_pct = 100.0 * float(np.median(differences)) / scale
    if not differences.any():
        return "pass", "identical latencies", 0.0
    p_value = float(wilcoxon(differences, alternative="two-sided").pvalue)
    if p_value < 1.0 - confidence and median_pct > threshold_pct:
        reason = f"median paired difference {median_pct:+.1f}% (p={p_value:.2g}) beyond {threshold_pct:g}%"
        return "fail", reason, median_pct
    return "pass", f"median paired difference {median_pct:+.1f}% (p={p_value:.2g})", median_pct


def shadow_compare(settings: ShadowSettings, threshold_pct: float = 20.0, confidence: float = 0.98) -> dict:
    requests = pcap_requests(settings.pcap, settings.server_port, settings.max_requests)
    blue, green = Replayer(settings.blue_url, settings.timeout_s), Replayer(settings.green_url, settings.timeout_s)
    mismatches = 0
    blue_latency, green_latency = [], []
    for index, request in enumerate(requests):
        order = (blue, green) if index % 2 == 0 else (green, blue)
        results = {id(replayer): replayer.send(request) for replayer in order}
        blue_result, green_result = results[id(blue)], results[id(green)]
        if blue_result[:2] != green_result[:2]:
            mismatches += 1
        if blue_result[0] and green_result[0]:
            blue_latency.append(blue_result[2])
            green_latency.append(green_result[2])
    verdict, reason, median_pct = paired_latency_verdict(np.array(blue_latency, dtype=np.float64),
                                                         np.array(green_latency, dtype=np.float64),
                                                         threshold_pct, confidence)
    total = len(requests)
    return {"requests": total, "mismatches": mismatches,
            "mismatch_pct": 100.0 * mismatches / total if total else 0.0,
            "paired": len(blue_latency), "median_paired_difference_pct": median_pct,
            "latency_verdict": verdict, "latency_reason": reason}
