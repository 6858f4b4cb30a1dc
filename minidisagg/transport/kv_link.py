"""The decode side of a KV link: serve one prefill worker's connection (``serve_kv_link``).

Frames are those of ``framing`` (``socket`` describes the exchange). A malformed frame or a
dead peer drops that one connection, and every reservation it held goes back to the pool. A
RESERVE or DONE the receiver refuses (a bad field, a full or unhealthy worker, a peer over its
quota) is answered with an ERROR naming the reason, and the link stays up; a refused DONE gives
its reservation back. A refusal for the quota carries ``"over_quota": true``: the sender waits
and asks again, as for a full pool.

A RESERVE may carry ``block_keys`` (hex): the decode side shares the blocks its prefix cache
holds for a leading run of them, says how many in the GRANT (``cached_blocks``), and the
transfer's pages then cover only the blocks after them.

With a receiver that tracks links (``PeerAwareReceiver``, the decode worker), each reservation
is a lease (``disagg.leases``). When one expires, this link frees its blocks (it is their only
writer: pages still in flight land first) and sends an unasked ERROR ``{"transfer_id",
"event": "lease_expired", "message"}``; later LAYER frames for it are read and dropped, each
answered with the same notice, and its DONE is refused with the reason. Notices carry
``event`` so a sender can tell them from the reply it waits for. A PING ``{"renew": [ids]}``
renews those transfers' leases: the sender's heartbeat while their prefill is still queued.

Pages quantised for the wire (``kv/wire_quant.py``) arrive as a ``WireMessage`` and are decoded
into the pool's dtype before they are written. A LAYER whose ``wire_dtype`` (absent: ``auto``)
is not the one this link expects, or whose message is corrupt, drops the link with the reason.
"""

from __future__ import annotations

import logging
import select
import socket
import threading
from collections import OrderedDict
from typing import Any, Optional

import torch

from minidisagg.engine.sequence import SequenceState
from minidisagg.kv.pages import KVLayout, split_ranges
from minidisagg.kv.wire_quant import WireFormatError, WireMessage, check_wire_dtype
from minidisagg.transport.base import (KVPeer, KVReceiver, LeaseExpired, PeerAwareReceiver, QuotaExceeded,
                                      reserve_sharing)
from minidisagg.transport.framing import FrameError, FrameKind, HeaderError, PeerClosed, recv_frame, send_frame
from minidisagg.transport.socket import FRAME_TIMEOUT_S
from minidisagg.transport.trace import kv_trace

log = logging.getLogger(__name__)
POLL_S = 0.2  # how often an idle link looks for expired leases and for ``stop``
MAX_EXPIRED_REMEMBERED = 1024  # expired transfers whose late frames this link still recognises
LEASE_EXPIRED_EVENT = "lease_expired"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def serve_kv_link(sock: socket.socket, receiver: KVReceiver, layout: KVLayout, stop: threading.Event,
                  peer: str = "", frame_timeout_s: float = FRAME_TIMEOUT_S, wire_dtype: str = "auto") -> None:
    """Serve one prefill worker's link until it says BYE, drops, or sends garbage.

    Whatever happens, reservations made over this link and not committed are cancelled.
    ``wire_dtype``: how this link's pages must travel (``LinkConfig.kv_wire_dtype``).
    """
    wire_dtype = check_wire_dtype(wire_dtype)
    session: Optional[KVPeer] = receiver.open_peer(peer or "a prefill worker") \
        if isinstance(receiver, PeerAwareReceiver) else None
    reserved: dict[str, int] = {}  # transfer id -> number of blocks
    expired: OrderedDict[str, tuple[int, str]] = OrderedDict()  # transfer id -> (blocks, why), once its lease ran out
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

    def blocks_of(tid: object) -> int:
        """How many blocks a LAYER's transfer has (or had, if its lease expired: its pages are then dropped)."""
        if isinstance(tid, str) and tid in reserved:
            return reserved[tid]
        if isinstance(tid, str) and tid in expired:
            return expired[tid][0]
        raise FrameError(f"LAYER for unknown transfer {tid!r}")

    def notice(tid: str, reason: str) -> None:
        """Tell the sender, unasked, that ``tid``'s lease expired (``event`` marks it as no reply)."""
        send_frame(sock, FrameKind.ERROR, {"transfer_id": tid, "request_id": None, "event": LEASE_EXPIRED_EVENT,
                                           "message": reason}, timeout_s=frame_timeout_s)

    def free_expired() -> None:
        """Free the blocks of this link's leases that expired (pages in flight land first), and say so."""
        for tid, reason in session.take_expired() if session is not None else ():
            if tid not in reserved:
                continue  # committed or cancelled meanwhile
            num_blocks = reserved.pop(tid)
            try:
                landed(tid)
            except (TimeoutError, ConnectionError, RuntimeError, ValueError) as exc:
                log.warning("pages of %s from %s still in flight as its lease expired: %s", tid,
                            peer or "a prefill worker", exc)
            announced.discard(tid)
            receiver.cancel(tid)
            expired[tid] = (num_blocks, reason)
            while len(expired) > MAX_EXPIRED_REMEMBERED:
                expired.popitem(last=False)
            notice(tid, reason)

    def next_frame_ready() -> bool:
        """Block until the peer sent bytes (True) or ``stop`` (False), freeing expired leases meanwhile."""
        while not stop.is_set():
            free_expired()
            ready, _, _ = select.select([sock], [], [], POLL_S)
            if ready:
                return not stop.is_set()  # a server that is stopping takes no new frame
        return False

    def checked_shape(header: dict[str, Any]) -> list[int]:
        """Check a LAYER header against its reservation; the shape of its pages."""
        tid, layer, shape = header.get("transfer_id"), header.get("layer"), header.get("shape")
        num_blocks = blocks_of(tid)
        if not _is_int(layer) or not 0 <= layer < layout.num_layers:
            raise FrameError(f"LAYER with bad layer index {layer!r}")
        expected = list(layout.layer_shape(num_blocks))
        if block_first(header):
            if layer != 0 or header.get("num_layers") != layout.num_layers:
                raise FrameError(f"LAYER in block order from layer {layer} with num_layers "
                                 f"{header.get('num_layers')!r}: it must hold all {layout.num_layers} layers")
            expected = list(layout.block_shape(num_blocks))
        elif "num_layers" in header:  # consecutive layers stacked in one message
            count = header["num_layers"]
            if not _is_int(count) or not 1 <= count <= layout.num_layers - layer:
                raise FrameError(f"LAYER with num_layers {count!r} from layer {layer} "
                                 f"(the model has {layout.num_layers})")
            expected = [count, *expected]
        if shape != expected or _DTYPES.get(header.get("dtype", "")) != layout.dtype:
            raise FrameError(f"LAYER pages {shape} {header.get('dtype')}; expected {expected} {layout.dtype_name}")
        if header.get("wire_dtype", "auto") != wire_dtype:
            raise FrameError(f"LAYER pages travel as wire_dtype {header.get('wire_dtype', 'auto')!r}, but this decode "
                             f"worker expects {wire_dtype!r}: give both workers the same kv_wire_dtype")
        return expected

    def checked_buffer(header: dict[str, Any], device: torch.device) -> torch.Tensor | WireMessage:
        """Check a LAYER header against its reservation; the staging tensor (or wire message) its pages go into."""
        expected = checked_shape(header)
        if wire_dtype != "auto":  # a message of its own: receives may be waited for later
            return WireMessage.empty(expected, wire_dtype, device)
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
        header["_tensor"] = buffer = checked_buffer(header, torch.device("cpu"))
        raw = buffer.data if isinstance(buffer, WireMessage) else buffer.view(torch.uint8)
        if nbytes != raw.numel():
            raise FrameError(f"LAYER payload of {nbytes} bytes; expected {raw.numel()}")
        return memoryview(raw.numpy()).cast("B")

    def pieces_of(header: dict[str, Any]) -> list[tuple[int, int]] | None:
        """The ranges (of layers, or of blocks in block order) a stacked message comes in (None: one layer)."""
        if "num_layers" not in header:
            if "pieces" in header or "announced" in header:
                raise FrameError("LAYER pieces and announcements need stacked layers (num_layers)")
            return None
        unit = "blocks" if block_first(header) else "layers"
        count, pieces = header["num_layers"], header.get("pieces", 1)
        if unit == "blocks":  # the pieces split the reservation's blocks
            count = blocks_of(header.get("transfer_id"))
        if not _is_int(count):
            raise FrameError(f"LAYER with num_layers {count!r}")
        if not _is_int(pieces) or not 1 <= pieces <= count:
            raise FrameError(f"LAYER with pieces {pieces!r} for {count} {unit}")
        if not isinstance(header.get("announced", False), bool):
            raise FrameError(f"LAYER with non-boolean announced {header.get('announced')!r}")
        return split_ranges(count, pieces)

    def write_pages(tid: str, first: int, pages: torch.Tensor | WireMessage, order: str) -> None:
        """Pages into the reservation: ``order`` is layer (one), layers (stacked) or blocks (block first)."""
        if isinstance(pages, WireMessage):
            try:
                pages = pages.decode(layout.dtype)
            except WireFormatError as exc:
                raise FrameError(f"LAYER for {tid}: {exc}") from None
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
        expected = checked_shape(header)
        order = "blocks" if block_first(header) else "layers" if ranges else "layer"
        src_rank = kv_dist.check_src_rank(header.get("src_rank"))
        if dist_source.setdefault("rank", src_rank) != src_rank:
            raise FrameError(f"LAYER via=dist from rank {src_rank} on a link that carried rank {dist_source['rank']}")
        kv_dist.SOURCE_CLAIMS.claim(src_rank, sock)
        tid, layer, on_gpu = header["transfer_id"], header["layer"], device.type == "cuda"
        live = tid in reserved  # else its lease expired: receive the pages (the pair stays in step), drop them
        if header.get("announced") and live:
            announced.add(tid)
        buffer: Optional[torch.Tensor] = None
        with kv_dist.receive_stream(device):  # see dist.py: Streams
            posted = []
            for first, end in ranges or [(0, 0)]:
                # block order: straight into the pool where the reserved blocks are one range of it
                view = receiver.block_region(tid, first, end) if order == "blocks" and live else None
                if wire_dtype != "auto":  # one message per piece, decoded into the pool once it is here
                    view = WireMessage.empty([end - first, *expected[1:]] if ranges else expected, wire_dtype, device)
                elif view is not None:
                    kv_trace("in-place", tid)
                else:
                    buffer = checked_buffer(header, device) if buffer is None else buffer
                    view = buffer[first:end] if ranges else buffer
                target = view.data if isinstance(view, WireMessage) else view
                posted.append((kv_dist.post_receive(target, src_rank), view, first if order == "blocks" else layer + first,
                               order))
            if header.get("announced") and not on_gpu and live:
                deferred.setdefault(tid, []).extend(posted)
                return
            for work, view, first, part in posted:
                kv_dist.finish_receive(work, on_gpu, src_rank, frame_timeout_s)
                if live:
                    write_pages(tid, first, view, part)
            if live:
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
        while next_frame_ready():
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
                    keys = h.get("block_keys", [])
                    if not isinstance(keys, list) or not all(isinstance(k, str) and len(k) <= 64 for k in keys):
                        raise ValueError("RESERVE block_keys must be a list of hex strings")
                    ok, num_shared = reserve_sharing(session.reserve if session is not None else receiver.reserve,
                                                     receiver, tid, num_tokens, [bytes.fromhex(k) for k in keys])
                except ValueError as exc:
                    reply_tid = tid if isinstance(tid, str) else None
                    error = {"transfer_id": reply_tid, "message": str(exc)}
                    if isinstance(exc, QuotaExceeded):
                        error["over_quota"] = True
                    send_frame(sock, FrameKind.ERROR, error, timeout_s=frame_timeout_s)
                    continue
                if ok:  # the pages fill the blocks after those the decode side shared from its prefix cache
                    reserved[tid] = -(-num_tokens // layout.block_size) - num_shared
                    expired.pop(tid, None)
                grant = {"transfer_id": tid, "ok": ok, **({"cached_blocks": num_shared} if num_shared else {})}
                send_frame(sock, FrameKind.GRANT, grant, timeout_s=frame_timeout_s)
            elif frame.kind == FrameKind.LAYER:
                via = h.get("via", "socket")
                kv_trace(f"layer-frame-{h.get('layer')}", tid)
                if session is not None and isinstance(tid, str) and tid in reserved:
                    try:
                        session.renew(tid)
                    except LeaseExpired:  # it ran out just now: free it as the decode loop asked
                        free_expired()
                try:
                    if via == "dist":
                        receive_dist(h)
                        kv_trace(f"layer-queued-{h.get('layer')}", tid)
                    elif via != "socket" or not isinstance(h.get("_tensor"), (torch.Tensor, WireMessage)):
                        raise FrameError(f"LAYER via={via!r} without pages")
                    elif block_first(h):
                        raise FrameError("LAYER in block order travels only via=dist")
                    elif tid in reserved:
                        write_pages(tid, h["layer"], h["_tensor"], "layers" if "num_layers" in h else "layer")
                except LeaseExpired:  # it ran out between the renewal and the write
                    free_expired()
                if isinstance(tid, str) and tid not in reserved and tid in expired:  # its lease ran out: dropped
                    notice(tid, expired[tid][1])
            elif frame.kind == FrameKind.DONE:
                if not isinstance(tid, str) or tid not in reserved:
                    why = expired[tid][1] if isinstance(tid, str) and tid in expired else \
                        f"DONE transfer_id: no reservation {tid!r} on this link"
                    send_frame(sock, FrameKind.ERROR, {"transfer_id": tid if isinstance(tid, str) else None,
                                                       "message": why}, timeout_s=frame_timeout_s)
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
                if isinstance(tid, str):
                    expired.pop(tid, None)
                if isinstance(tid, str) and reserved.pop(tid, None) is not None:
                    landed(tid)
                    announced.discard(tid)  # nothing may still be writing into blocks that go back to the pool
                    receiver.cancel(tid)
            elif frame.kind == FrameKind.BYE:
                return
            elif frame.kind == FrameKind.PING:  # with "renew": the sender's transfers still under way
                renew = h.get("renew")
                for rid in renew if isinstance(renew, list) and session is not None else ():
                    if isinstance(rid, str) and rid in reserved:
                        try:
                            session.renew(rid)
                        except LeaseExpired:  # too late: its notice is on the way
                            pass
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
            if session is None:
                receiver.cancel(tid)
        if session is not None:
            session.close()  # every reservation still held goes back (the decode worker logs how many blocks)
        if dist_source:
            from minidisagg.transport.dist_receive import SOURCE_CLAIMS

            SOURCE_CLAIMS.release(sock)
        sock.close()
