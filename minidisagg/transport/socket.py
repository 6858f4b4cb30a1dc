"""TCP transport: KV pages cross a real socket between processes (or hosts), by layer or all layers at once.

The prefill side holds a ``SocketSender`` per decode worker; the decode side runs
``serve_kv_link`` for each prefill connection. Frames are those of ``framing``: RESERVE ->
GRANT, LAYER (payload = one layer's pages, or with ``num_layers`` that many consecutive
layers stacked; with ``via: dist`` the pages follow by
torch.distributed instead, see ``dist.py``), DONE -> ACK, CANCEL. A malformed frame or a
dead peer drops that one connection, and every reservation it held goes back to the pool. A
RESERVE or DONE the receiver refuses (a bad field, a full or unhealthy worker) is answered with
an ERROR naming the reason, and the link stays up; a refused DONE gives its reservation back.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
import time
from typing import Any, Callable, Optional, Sequence

import torch

from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.pages import KV_LAYOUT_NAME, KVLayout, split_ranges
from minidisagg.transport.auth import LinkSecurity, open_link
from minidisagg.transport.base import KVReceiver, KVSender, TransferError
from minidisagg.transport.trace import kv_trace
from minidisagg.transport.framing import (
    FrameError,
    FrameKind,
    HeaderError,
    Hello,
    PeerClosed,
    recv_frame,
    send_frame,
)

log = logging.getLogger(__name__)
FRAME_TIMEOUT_S = 30.0
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def make_hello(role: str, fingerprint: str, layout: KVLayout) -> Hello:
    """The Hello a worker of ``role`` sends or expects for this model and KV layout."""
    return Hello(role=role, fingerprint=fingerprint, dtype=layout.dtype_name, block_size=layout.block_size,
                 kv_layout=KV_LAYOUT_NAME)


class SocketSender(KVSender):
    """One TCP link from a prefill worker to a decode worker (thread-safe; one exchange at a time)."""

    name = "socket"

    def __init__(self, host: str, port: int, hello: Hello, timeout_s: float = FRAME_TIMEOUT_S,
                 connect_retries: int = 50, security: Optional[LinkSecurity] = None) -> None:
        """``security``: the deployment's secret (and TLS) this link proves and checks; None: neither."""
        super().__init__()
        self.address = f"{host}:{port}"
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self.sock, _ = open_link(host, port, hello, security or LinkSecurity(), timeout_s, retries=connect_retries)
        self._broken: Optional[str] = None

    def _exchange(self, kind: FrameKind, header: dict[str, Any], reply_kind: Optional[FrameKind],
                  payload: Optional[torch.Tensor] = None, timeout_s: Optional[float] = None) -> dict[str, Any]:
        if self._broken is not None:
            raise TransferError(f"link to {self.address} is down: {self._broken}")
        timeout = timeout_s or self.timeout_s
        try:
            with self._lock:
                send_frame(self.sock, kind, header, payload, timeout_s=timeout)
                if reply_kind is None:
                    return {}
                reply = recv_frame(self.sock, timeout, max_payload_bytes=0)
        except (OSError, FrameError) as exc:
            raise self._fail(exc) from exc
        if reply.kind == FrameKind.ERROR:
            raise TransferError(f"{self.address} refused: {reply.header.get('message')}")
        if reply.kind != reply_kind or reply.header.get("transfer_id") != header.get("transfer_id"):
            self._broken = f"expected {reply_kind.name}, got {reply.kind.name}"
            self.sock.close()
            raise TransferError(f"link to {self.address} is out of step: {self._broken}")
        return reply.header

    def reserve(self, transfer_id: str, num_tokens: int, timeout_s: float) -> bool:
        """RESERVE -> GRANT."""
        reply = self._exchange(FrameKind.RESERVE, {"transfer_id": transfer_id, "num_tokens": num_tokens},
                               FrameKind.GRANT, timeout_s=timeout_s)
        return bool(reply.get("ok"))

    @property
    def is_broken(self) -> bool:
        """Whether the link is down for good."""
        return self._broken is not None

    def _fail(self, exc: BaseException) -> TransferError:
        self._broken = str(exc)
        self.sock.close()
        return TransferError(f"link to {self.address} failed: {exc}")

    def reserve_many(self, requests: Sequence[tuple[str, int]], timeout_s: float) -> list[bool | TransferError]:
        """Every RESERVE first, then every reply: one round trip for the lot instead of one per request."""
        if self._broken is not None:
            raise TransferError(f"link to {self.address} is down: {self._broken}")
        answers: list[bool | TransferError] = []
        with self._lock:
            try:
                for transfer_id, num_tokens in requests:
                    send_frame(self.sock, FrameKind.RESERVE, {"transfer_id": transfer_id, "num_tokens": num_tokens},
                               timeout_s=timeout_s)
                for transfer_id, _ in requests:
                    reply = recv_frame(self.sock, timeout_s, max_payload_bytes=0)
                    if reply.header.get("transfer_id") != transfer_id or reply.kind not in (FrameKind.GRANT,
                                                                                            FrameKind.ERROR):
                        raise FrameError(f"expected GRANT for {transfer_id}, got {reply.kind.name} {reply.header}")
                    answers.append(bool(reply.header.get("ok")) if reply.kind == FrameKind.GRANT else
                                   TransferError(f"{self.address} refused: {reply.header.get('message')}"))
            except (OSError, FrameError) as exc:
                raise self._fail(exc) from exc
        return answers

    def _layer_header(self, transfer_id: str, layer: int, pages: torch.Tensor, stacked: bool) -> dict[str, Any]:
        header = {"transfer_id": transfer_id, "layer": layer, "shape": list(pages.shape),
                  "dtype": str(pages.dtype).removeprefix("torch.")}
        if stacked:
            header["num_layers"] = pages.shape[0]
        return header

    def _send_pages(self, transfer_id: str, layer: int, pages: torch.Tensor, stacked: bool) -> None:
        pages = pages.detach().to("cpu").contiguous()
        t0 = time.perf_counter()
        self._exchange(FrameKind.LAYER, self._layer_header(transfer_id, layer, pages, stacked), None, pages)
        self.stats.send_s += time.perf_counter() - t0
        self.stats.bytes_sent += pages.numel() * pages.element_size()

    def send_layer(self, transfer_id: str, layer: int, pages: torch.Tensor) -> None:
        """One LAYER frame; the payload is the pages' own memory (no copy)."""
        self._send_pages(transfer_id, layer, pages, stacked=False)

    def send_layers(self, transfer_id: str, first_layer: int, pages: torch.Tensor) -> None:
        """One LAYER frame for consecutive layers (header ``num_layers``; shape [num_layers, 2, ...])."""
        self._send_pages(transfer_id, first_layer, pages, stacked=True)

    def commit(self, transfer_id: str, state: SequenceState, num_bytes: int, timeout_s: float) -> None:
        """DONE -> ACK; a refusal raises TransferError."""
        reply = self._exchange(FrameKind.DONE, {"transfer_id": transfer_id, "state": state.to_dict(),
                                                "num_bytes": num_bytes}, FrameKind.ACK, timeout_s=timeout_s)
        if not reply.get("ok"):
            raise TransferError(f"{self.address} could not adopt {transfer_id}: {reply.get('error')}")
        self.stats.num_transfers += 1

    def cancel(self, transfer_id: str) -> None:
        """CANCEL, best effort (a dead link frees the reservation on its own)."""
        try:
            self._exchange(FrameKind.CANCEL, {"transfer_id": transfer_id}, None)
        except TransferError:
            pass

    def close(self) -> None:
        """Say BYE and close."""
        if self._broken is None:
            try:
                with self._lock:
                    send_frame(self.sock, FrameKind.BYE, {}, timeout_s=1.0)
            except OSError:
                pass
        self.sock.close()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def wait_readable(sock: socket.socket, stop: threading.Event, poll_s: float = 0.2) -> bool:
    """Block until ``sock`` has bytes (True) or ``stop`` is set (False).

    A TLS stream may hold decrypted bytes that ``select`` on its socket cannot see: ``pending`` first.
    """
    pending = getattr(sock, "pending", None)
    while not stop.is_set():
        if pending is not None and pending():
            return True
        ready, _, _ = select.select([sock], [], [], poll_s)
        if ready:
            return True
    return False


def serve_kv_link(sock: socket.socket, receiver: KVReceiver, layout: KVLayout, stop: threading.Event,
                  peer: str = "", frame_timeout_s: float = FRAME_TIMEOUT_S) -> None:
    """Serve one prefill worker's link until it says BYE, drops, or sends garbage.

    Whatever happens, reservations made over this link and not committed are cancelled.
    """
    reserved: dict[str, int] = {}  # transfer id -> number of blocks
    # staging buffer per (block count, device), reused (fresh pages cost bandwidth)
    buffers: dict[tuple[int, str], torch.Tensor] = {}
    dist_source: dict[str, int] = {}  # the prefill rank this link's via=dist pages come from, once seen

    landing: dict[str, Any] = {}  # transfer id -> event after its last queued scatter (GPU)
    deferred: dict[str, list[tuple[Any, torch.Tensor, int, str]]] = {}  # CPU: announced receives not yet waited
    announced: set[str] = set()  # transfers whose pages were announced (their landing time is measured)

    def block_first(header: dict[str, Any]) -> bool:
        """Whether a LAYER message holds every layer block first ([blocks, layers, 2, ...], ``order: blocks``)."""
        order = header.get("order", "layers")
        if order not in ("layers", "blocks"):
            raise FrameError(f"LAYER with unknown order {order!r} (layers or blocks)")
        return order == "blocks"

    def checked_shape(header: dict[str, Any]) -> list[int]:
        """Check a LAYER header against its reservation; the shape of its pages."""
        tid, layer, shape = header.get("transfer_id"), header.get("layer"), header.get("shape")
        if tid not in reserved:
            raise FrameError(f"LAYER for unknown transfer {tid!r}")
        if not _is_int(layer) or not 0 <= layer < layout.num_layers:
            raise FrameError(f"LAYER with bad layer index {layer!r}")
        expected = list(layout.layer_shape(reserved[tid]))
        if block_first(header):
            if layer != 0 or header.get("num_layers") != layout.num_layers:
                raise FrameError(f"LAYER in block order from layer {layer} with num_layers "
                                 f"{header.get('num_layers')!r}: it must hold all {layout.num_layers} layers")
            expected = list(layout.block_shape(reserved[tid]))
        elif "num_layers" in header:  # consecutive layers stacked in one message
            count = header["num_layers"]
            if not _is_int(count) or not 1 <= count <= layout.num_layers - layer:
                raise FrameError(f"LAYER with num_layers {count!r} from layer {layer} "
                                 f"(the model has {layout.num_layers})")
            expected = [count, *expected]
        if shape != expected or _DTYPES.get(header.get("dtype", "")) != layout.dtype:
            raise FrameError(f"LAYER pages {shape} {header.get('dtype')}; expected {expected} {layout.dtype_name}")
        return expected

    def checked_buffer(header: dict[str, Any], device: torch.device) -> torch.Tensor:
        """Check a LAYER header against its reservation; the staging tensor its pages go into."""
        expected = checked_shape(header)
        if header.get("announced") and device.type != "cuda":  # waited for later: its own buffer
            return torch.empty(expected, dtype=layout.dtype, device=device)
        key = (tuple(expected), str(device))
        buffer = buffers.get(key)
        if buffer is None:
            buffer = buffers[key] = torch.empty(expected, dtype=layout.dtype, device=device)
            if len(buffers) > 8:
                buffers.pop(next(iter(buffers)))
        return buffer

    def staging(header: dict[str, Any], nbytes: int) -> memoryview:
        if header.get("via", "socket") != "socket":
            raise FrameError(f"LAYER via={header.get('via')!r} must not carry a payload")
        if block_first(header):
            raise FrameError("LAYER in block order travels only via=dist")
        buffer = checked_buffer(header, torch.device("cpu"))
        if nbytes != buffer.numel() * buffer.element_size():
            raise FrameError(f"LAYER payload of {nbytes} bytes; expected {buffer.numel() * buffer.element_size()}")
        header["_tensor"] = buffer
        return memoryview(buffer.view(torch.uint8).numpy()).cast("B")

    def pieces_of(header: dict[str, Any]) -> list[tuple[int, int]] | None:
        """The ranges (of layers, or of blocks in block order) a stacked message comes in (None: one layer)."""
        if "num_layers" not in header:
            if "pieces" in header or "announced" in header:
                raise FrameError("LAYER pieces and announcements need stacked layers (num_layers)")
            return None
        unit = "blocks" if block_first(header) else "layers"
        count, pieces = header["num_layers"], header.get("pieces", 1)
        if unit == "blocks":  # the pieces split the reservation's blocks
            if header.get("transfer_id") not in reserved:
                raise FrameError(f"LAYER for unknown transfer {header.get('transfer_id')!r}")
            count = reserved[header["transfer_id"]]
        if not _is_int(count):
            raise FrameError(f"LAYER with num_layers {count!r}")
        if not _is_int(pieces) or not 1 <= pieces <= count:
            raise FrameError(f"LAYER with pieces {pieces!r} for {count} {unit}")
        if not isinstance(header.get("announced", False), bool):
            raise FrameError(f"LAYER with non-boolean announced {header.get('announced')!r}")
        return split_ranges(count, pieces)

    def write_pages(tid: str, first: int, pages: torch.Tensor, order: str) -> None:
        """Pages into the reservation: ``order`` is layer (one), layers (stacked) or blocks (block first)."""
        if order == "blocks":
            receiver.write_blocks(tid, first, pages)
        elif order == "layers":
            receiver.write_layers(tid, first, pages)
        else:
            receiver.write_layer(tid, first, pages)

    def receive_dist(header: dict[str, Any]) -> None:
        """Header checked like a socket payload's; the pages' receives posted and their scatters queued (dist.py)."""
        from minidisagg.transport import dist_receive as kv_dist  # torch.distributed only when a link uses it

        device = kv_dist.transfer_device()
        ranges = pieces_of(header)
        checked_shape(header)
        order = "blocks" if block_first(header) else "layers" if ranges else "layer"
        src_rank = kv_dist.check_src_rank(header.get("src_rank"))
        if dist_source.setdefault("rank", src_rank) != src_rank:
            raise FrameError(f"LAYER via=dist from rank {src_rank} on a link that carried rank {dist_source['rank']}")
        kv_dist.SOURCE_CLAIMS.claim(src_rank, sock)
        tid, layer, on_gpu = header["transfer_id"], header["layer"], device.type == "cuda"
        if header.get("announced"):
            announced.add(tid)
        buffer: Optional[torch.Tensor] = None
        with kv_dist.receive_stream(device):  # see dist.py: Streams
            posted = []
            for first, end in ranges or [(0, 0)]:
                # block order: straight into the pool where the reserved blocks are one range of it
                view = receiver.block_region(tid, first, end) if order == "blocks" else None
                if view is not None:
                    kv_trace("in-place", tid)
                else:
                    buffer = checked_buffer(header, device) if buffer is None else buffer
                    view = buffer[first:end] if ranges else buffer
                posted.append((kv_dist.post_receive(view, src_rank), view, first if order == "blocks" else layer + first,
                               order))
            if header.get("announced") and not on_gpu:
                deferred.setdefault(tid, []).extend(posted)
                return
            for work, view, first, part in posted:
                kv_dist.finish_receive(work, on_gpu, src_rank, frame_timeout_s)
                write_pages(tid, first, view, part)
            landing[tid] = kv_dist.mark_received(device)

    def landed(tid: str) -> Optional[float]:
        """Wait until pages received by torch.distributed for ``tid`` sit in the pool (once per request).

        Returns when they got there (a ``time.perf_counter()`` reading), or None without such pages.
        """
        if not dist_source:
            return None
        from minidisagg.transport import dist_receive as kv_dist

        for work, view, first, order in deferred.pop(tid, []):
            kv_dist.finish_receive(work, False, dist_source["rank"], frame_timeout_s)
            write_pages(tid, first, view, order)
        landed_at_s = kv_dist.wait_received(landing.pop(tid, None), frame_timeout_s)
        return landed_at_s if tid in announced else None

    try:
        while wait_readable(sock, stop):
            try:
                frame = recv_frame(sock, frame_timeout_s, into=staging)
            except HeaderError as exc:  # read whole (no payload): refuse it, the link is still in step
                send_frame(sock, FrameKind.ERROR, {"transfer_id": None, "message": f"header: {exc}"},
                           timeout_s=frame_timeout_s)
                continue
            h = frame.header
            tid = h.get("transfer_id")
            if frame.kind == FrameKind.RESERVE:
                num_tokens = h.get("num_tokens")
                try:
                    if not isinstance(tid, str) or not tid:
                        raise ValueError(f"RESERVE transfer_id must be a non-empty string, got {tid!r}")
                    if not _is_int(num_tokens) or num_tokens < 1:
                        raise ValueError(f"RESERVE num_tokens must be an integer >= 1, got {num_tokens!r}")
                    if tid in reserved:
                        raise ValueError(f"RESERVE transfer_id {tid!r} already holds a reservation on this link")
                    ok = receiver.reserve(tid, num_tokens)
                except ValueError as exc:
                    reply_tid = tid if isinstance(tid, str) else None
                    send_frame(sock, FrameKind.ERROR, {"transfer_id": reply_tid, "message": str(exc)},
                               timeout_s=frame_timeout_s)
                    continue
                if ok:
                    reserved[tid] = -(-num_tokens // layout.block_size)
                send_frame(sock, FrameKind.GRANT, {"transfer_id": tid, "ok": ok}, timeout_s=frame_timeout_s)
            elif frame.kind == FrameKind.LAYER:
                via = h.get("via", "socket")
                kv_trace(f"layer-frame-{h.get('layer')}", tid)
                if via == "dist":
                    receive_dist(h)
                    kv_trace(f"layer-queued-{h.get('layer')}", tid)
                elif via != "socket" or not isinstance(h.get("_tensor"), torch.Tensor):
                    raise FrameError(f"LAYER via={via!r} without pages")
                elif block_first(h):
                    raise FrameError("LAYER in block order travels only via=dist")
                else:
                    write_pages(tid, h["layer"], h["_tensor"], "layers" if "num_layers" in h else "layer")
            elif frame.kind == FrameKind.DONE:
                if not isinstance(tid, str) or tid not in reserved:
                    send_frame(sock, FrameKind.ERROR, {"transfer_id": tid if isinstance(tid, str) else None,
                                                       "message": f"DONE transfer_id: no reservation {tid!r} on this link"},
                               timeout_s=frame_timeout_s)
                    continue
                kv_trace("done-frame", tid)
                landed_at_s = landed(tid)
                kv_trace("landed", tid)
                announced.discard(tid)
                state_dict = h.get("state")
                num_bytes = h.get("num_bytes", 0)
                try:
                    if not _is_int(num_bytes) or num_bytes < 0:
                        raise ValueError(f"num_bytes must be an integer >= 0, got {num_bytes!r}")
                    receiver.commit(tid, SequenceState.from_dict(state_dict), num_bytes, landed_at_s=landed_at_s)
                    kv_trace("committed", tid)
                    reserved.pop(tid)
                    send_frame(sock, FrameKind.ACK, {"transfer_id": tid, "ok": True}, timeout_s=frame_timeout_s)
                except (ValueError, TypeError) as exc:  # refused: nothing will use the reservation now
                    reserved.pop(tid)
                    receiver.cancel(tid)
                    rid = state_dict.get("request_id") if isinstance(state_dict, dict) else None
                    send_frame(sock, FrameKind.ERROR, {"transfer_id": tid, "request_id": rid if isinstance(rid, str)
                                                       else None, "message": str(exc)}, timeout_s=frame_timeout_s)
            elif frame.kind == FrameKind.CANCEL:
                if reserved.pop(tid, None) is not None:
                    landed(tid)
                    announced.discard(tid)  # nothing may still be writing into blocks that go back to the pool
                    receiver.cancel(tid)
            elif frame.kind == FrameKind.BYE:
                return
            elif frame.kind == FrameKind.PING:
                send_frame(sock, FrameKind.ACK, {"transfer_id": tid}, timeout_s=frame_timeout_s)
            else:
                raise FrameError(f"unexpected {frame.kind.name} frame on a KV link")
    except PeerClosed:
        pass
    except (FrameError, OSError, KeyError) as exc:
        log.warning("dropping KV link from %s: %s", peer or "a prefill worker", exc)
        try:
            send_frame(sock, FrameKind.ERROR, {"message": str(exc)}, timeout_s=1.0)
        except OSError:
            pass
    finally:
        in_flight = None  # after one receive that never ends, the ones queued behind it cannot end either
        for tid in reserved:
            try:
                if in_flight is None:
                    landed(tid)
            except (TimeoutError, ConnectionError, RuntimeError, ValueError) as exc:
                in_flight = exc
                log.warning("pages of %s from %s still in flight as its link closed: %s", tid,
                            peer or "a prefill worker", exc)
            receiver.cancel(tid)
        if dist_source:
            from minidisagg.transport.dist_receive import SOURCE_CLAIMS

            SOURCE_CLAIMS.release(sock)
        sock.close()


Handler = Callable[[socket.socket, str], None]


def parse_host_port(text: str) -> tuple[str, int]:
    """``host:port`` (IPv6 hosts may be bracketed) -> (host, port); ValueError when malformed."""
    host, _, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"expected host:port, got {text!r}")
    return host, int(port)


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    server = socket.create_server((host, port), reuse_port=False)
    server.listen(64)
    return server


def accept_loop(server: socket.socket, handler: Handler, stop: threading.Event, name: str) -> None:
    """Accept connections until ``stop``; each one is handled on its own daemon thread."""
    server.settimeout(0.2)
    while not stop.is_set():
        try:
            conn, addr = server.accept()
        except socket.timeout:
            continue
        except OSError:
            return
        conn.settimeout(None)
        peer = f"{addr[0]}:{addr[1]}"
        threading.Thread(target=handler, args=(conn, peer), name=f"{name}-{peer}", daemon=True).start()
