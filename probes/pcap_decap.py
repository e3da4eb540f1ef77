"""Tunnels and link encapsulations around the TCP/IP packets of a capture, unwrapped with the
same vectorised gathers as probes/pcap_reader.py, and the account of what was not decoded.

Overlay networks put the TCP flow the user cares about inside another header: VXLAN (UDP 4789,
RFC 7348), Geneve (UDP 6081, RFC 8926), GRE (RFC 2784/2890: checksum, key and sequence fields;
transparent Ethernet bridging; ERSPAN type I/II/III), IP-in-IP and IPv6-in-IP / 6in4 (IP
protocols 4 and 41), MPLS label stacks (ethertypes 0x8847/0x8848, with or without a
pseudowire control word before an Ethernet payload) and PPPoE sessions (0x8864). Each round
peels one layer off every packet still wrapped, so a stack such as MPLS → GRE → VXLAN costs one
round per layer for the packets that have it and nothing for plain packets. Flows are keyed by
the innermost 5-tuple; the chain of layers is kept per packet as 4-bit codes (outermost in the
low bits) for the flows table.

Packets that are not TCP are counted per reason: the ones that simply are something else (ARP,
UDP, ICMP...) as "not TCP", the ones that may hide TCP the analysis could not see (ESP, an
unknown ethertype or GRE protocol, headers cut by the snap length, an unsupported link type,
TCP in IP fragments) as "not decoded". The manifest carries both; a finding says when a
significant share was not decoded.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_TRANSPARENT_ETHERNET = 0x6558  # GRE / Geneve protocol type of a whole Ethernet frame
ETHERTYPE_MPLS = (0x8847, 0x8848)
ETHERTYPE_PPPOE_SESSION = 0x8864
ETHERTYPE_ERSPAN_2 = 0x88BE  # also type I (GRE without a sequence number, no ERSPAN header)
ETHERTYPE_ERSPAN_3 = 0x22EB
VLAN_TAGS = (0x8100, 0x88A8, 0x9100)
UDP_PORT_VXLAN = 4789
UDP_PORT_GENEVE = 6081
IP_PROTOCOL_TCP = 6
IPV6_EXTENSION_HEADERS = (0, 43, 44, 60)  # hop-by-hop, routing, fragment, destination options

# Nested layers peeled at most (a chain deeper than this is counted as not decoded); a layer
# takes up to three steps (IP -> GRE/UDP header -> inner Ethernet -> inner IP).
MAXIMUM_LAYERS = 6
MAXIMUM_STEPS = 3 * MAXIMUM_LAYERS
MAXIMUM_MPLS_LABELS = 8

# Encapsulation kinds (4-bit codes of the per-packet chain).
KIND_NAMES = {1: "vxlan", 2: "geneve", 3: "gre", 4: "erspan", 5: "ip-in-ip", 6: "ipv6-in-ip", 7: "mpls",
              8: "pppoe"}
(KIND_VXLAN, KIND_GENEVE, KIND_GRE, KIND_ERSPAN, KIND_IP_IN_IP, KIND_IPV6_IN_IP, KIND_MPLS,
 KIND_PPPOE) = range(1, 9)

# States beyond the 16-bit ethertypes: (category << 32) | value. A packet in an intermediate
# state (GRE or UDP header next) is unwrapped further; one left in a final category is counted.
CATEGORY_ETHERTYPE = 0
CATEGORY_GRE_HEADER = 1
CATEGORY_UDP_HEADER = 2
CATEGORY_IP_PROTOCOL = 3
CATEGORY_FRAGMENT = 4
CATEGORY_CUT = 5
CATEGORY_LINKTYPE = 6
CATEGORY_GRE_PROTOCOL = 7
CATEGORY_MPLS_PAYLOAD = 8
CATEGORY_PPP_PROTOCOL = 9
CATEGORY_TOO_DEEP = 10
CATEGORY_IP_VERSION = 11
CATEGORY_GRE_VERSION = 12
CATEGORY_GENEVE_PROTOCOL = 13
CATEGORY_ADDRESS_FAMILY = 14  # BSD loopback header naming neither IPv4 nor IPv6
STATE_GRE = CATEGORY_GRE_HEADER << 32
STATE_UDP = CATEGORY_UDP_HEADER << 32


def unsupported_link_state(linktype: int) -> int:
    return (CATEGORY_LINKTYPE << 32) | linktype

ETHERTYPE_NAMES = {0x0806: "ARP", 0x8035: "RARP", 0x88CC: "LLDP", 0x8809: "LACP/slow protocols",
                   0x88F7: "PTP", 0x8863: "PPPoE discovery", 0x888E: "EAPOL", 0x8808: "Ethernet flow control",
                   0x9000: "Ethernet loopback", 0x88E5: "MACsec", 0x8915: "RoCE", 0x88B5: "local experimental",
                   0x8906: "FCoE", 0x8914: "FIP"}
# Not IP and not hiding TCP: counted as "not TCP", never as a decoding gap.
ETHERTYPES_NOT_TCP = {0x0806, 0x8035, 0x88CC, 0x8809, 0x88F7, 0x8863, 0x888E, 0x8808, 0x9000, 0x8906, 0x8914}
IP_PROTOCOL_NAMES = {0: "IPv6 hop-by-hop", 1: "ICMP", 2: "IGMP", 4: "IP-in-IP", 17: "UDP", 41: "IPv6-in-IP",
                     43: "IPv6 routing", 47: "GRE", 50: "ESP", 51: "AH", 58: "ICMPv6", 59: "IPv6 no next header",
                     60: "IPv6 destination options", 89: "OSPF", 103: "PIM", 112: "VRRP", 115: "L2TP",
                     132: "SCTP", 136: "UDP-Lite"}
IP_PROTOCOLS_NOT_TCP = {1, 2, 17, 58, 59, 89, 103, 112, 132, 136}
PPP_PROTOCOLS_NOT_TCP = {0xC021, 0x8021, 0x8057, 0xC023, 0xC223}  # LCP, IPCP, IPv6CP, PAP, CHAP

# A finding when at least this share of the packets was not decoded.
NOT_DECODED_FINDING_SHARE = 0.01


@dataclass
class Views:
    """Unaligned views of one block's bytes (see pcap_reader.unaligned_view)."""

    u8: np.ndarray
    be16: np.ndarray
    be32: np.ndarray
    be64: np.ndarray
    limit: int  # highest index every view can be read at

    def safe(self, offsets: np.ndarray) -> np.ndarray:
        # Hostile lengths can point anywhere: keep gathers inside the buffer (the rows are
        # judged against their captured end, so a clamped read never decides anything).
        return np.minimum(offsets, self.limit - 16)


def ethernet_payload(views: Views, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ethertype and payload offset of Ethernet frames starting at `base` (inside the buffer),
    past 802.1Q / QinQ tags."""
    kind = views.be16[base + 12].astype(np.int64)
    offset = base + 14
    for _ in range(2):
        tagged = (kind == VLAN_TAGS[0]) | (kind == VLAN_TAGS[1]) | (kind == VLAN_TAGS[2])
        if not tagged.any():
            break
        kind = np.where(tagged, views.be16[offset + 2], kind)
        offset = np.where(tagged, offset + 4, offset)
    return kind, offset


def ipv6_upper_layer(views: Views, l3: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per IPv6 header at `l3`: the protocol after up to three extension headers, where it
    starts, and whether this is a later fragment (its upper-layer header is elsewhere)."""
    u8, be16 = views.u8, views.be16
    next_header = u8[views.safe(l3 + 6)].astype(np.int64)
    upper = l3 + 40
    later_fragment = np.zeros(len(l3), dtype=bool)
    for _ in range(3):
        extension = np.isin(next_header, IPV6_EXTENSION_HEADERS)
        if not extension.any():
            break
        at = views.safe(upper)
        length = np.where(next_header == 44, 8, (u8[at + 1].astype(np.int64) + 1) * 8)
        later_fragment |= extension & (next_header == 44) & ((be16[at + 2].astype(np.int64) & 0xFFF8) != 0)
        next_header = np.where(extension, u8[at], next_header)
        upper = np.where(extension, upper + length, upper)
    return next_header, np.minimum(upper, views.limit - 16), later_fragment


def wrapped_rows(ethertype: np.ndarray, word6: np.ndarray) -> np.ndarray:
    """Rows that may carry TCP under another header: everything but IPv4/IPv6 directly carrying
    TCP (the common case costs three passes and no unwrapping)."""
    plain = (ethertype == ETHERTYPE_IPV4) & ((word6 & 0xFF) == IP_PROTOCOL_TCP)
    if plain.all():
        return np.zeros(0, dtype=np.int64)
    plain |= (ethertype == ETHERTYPE_IPV6) & ((word6 >> 24) == IP_PROTOCOL_TCP)
    return np.flatnonzero(~plain)


@dataclass
class Unwrapped:
    """The innermost state of the unwrapped rows. `word0`/`word6` are the IP header words at
    `offset` where `has_words` (read while looking for a tunnel there), so the TCP decoding
    does not gather them again: each gather is a pass over the block's memory."""

    state: np.ndarray
    offset: np.ndarray
    chain: np.ndarray
    word0: np.ndarray
    word6: np.ndarray
    has_words: np.ndarray


def unwrap(views: Views, ethertype: np.ndarray, l3: np.ndarray, captured_end: np.ndarray,
           rows: np.ndarray) -> Unwrapped:
    """Peel encapsulations off `rows`: their new state (ethertype or category state), network
    offset and encapsulation chain (0 = none)."""
    state = ethertype[rows].astype(np.int64)
    offset = l3[rows].astype(np.int64)
    end = captured_end[rows]
    chain = np.zeros(len(rows), dtype=np.int64)
    depth = np.zeros(len(rows), dtype=np.int64)
    word0 = np.zeros(len(rows), dtype=np.uint32)
    word6 = np.zeros(len(rows), dtype=np.uint32)
    has_words = np.zeros(len(rows), dtype=bool)
    active = np.arange(len(rows))
    for _ in range(MAXIMUM_STEPS + 1):
        if not len(active):
            break
        step = _peel(views, state[active], offset[active], end[active])
        state[active], offset[active] = step.state, step.offset
        read = active[step.has_words]
        word0[read], word6[read] = step.word0[step.has_words], step.word6[step.has_words]
        has_words[active] = step.has_words & ~step.moved
        layered = step.kind > 0
        chain[active[layered]] |= step.kind[layered] << (4 * depth[active[layered]])
        depth[active[layered]] += 1
        active = active[step.moved]
    if len(active):
        state[active] = (CATEGORY_TOO_DEEP << 32) | (state[active] & 0xFFFF)
        has_words[active] = False
    return Unwrapped(state, offset, chain, word0, word6, has_words)


class _Step:
    """One peeling step over the active rows: each header kind is handled on its own rows
    (index arrays), so a block of VXLAN packets pays for VXLAN only."""

    def __init__(self, state: np.ndarray, offset: np.ndarray, end: np.ndarray):
        self.end = end
        self.state, self.offset = state.copy(), offset.copy()
        self.kind = np.zeros(len(state), dtype=np.int64)
        self.moved = np.zeros(len(state), dtype=bool)
        self.word0 = np.zeros(len(state), dtype=np.uint32)
        self.word6 = np.zeros(len(state), dtype=np.uint32)
        self.has_words = np.zeros(len(state), dtype=bool)

    def go(self, rows: np.ndarray, to_state, to_offset: np.ndarray, layer_kind: int = 0,
           header_bytes: int = 0) -> None:
        """`rows` move on to `to_state` at `to_offset`, unless the header they need there was
        cut by the snap length (then they stop, counted as cut inside this layer)."""
        if not len(rows):
            return
        cut = to_offset + header_bytes > self.end[rows]
        fine = ~cut
        rows_fine = rows[fine]
        self.state[rows_fine] = to_state[fine] if isinstance(to_state, np.ndarray) else to_state
        self.offset[rows_fine] = to_offset[fine]
        self.state[rows[cut]] = (CATEGORY_CUT << 32) | layer_kind
        self.kind[rows] = layer_kind
        self.moved[rows_fine] = True

    def stop(self, rows: np.ndarray, category: int, value) -> None:
        self.state[rows] = (category << 32) | value


def _peel(views: Views, state: np.ndarray, offset: np.ndarray, end: np.ndarray) -> _Step:
    """One layer off each packet."""
    step = _Step(state, offset, end)
    ip_rows = np.flatnonzero((state == ETHERTYPE_IPV4) | (state == ETHERTYPE_IPV6))
    if len(ip_rows):
        _peel_ip(views, step, ip_rows, state[ip_rows], offset[ip_rows])
    for value, peel in ((STATE_GRE, _peel_gre), (STATE_UDP, _peel_udp),
                        (ETHERTYPE_TRANSPARENT_ETHERNET, _peel_ethernet), (ETHERTYPE_MPLS[0], _peel_mpls),
                        (ETHERTYPE_MPLS[1], _peel_mpls), (ETHERTYPE_PPPOE_SESSION, _peel_pppoe)):
        rows = np.flatnonzero(state == value)
        if len(rows):
            peel(views, step, rows, offset[rows])
    return step


def _peel_ip(views: Views, step: _Step, rows, state, offset) -> None:
    """IPv4 / IPv6 carrying a tunnel protocol: on to the inner IP, GRE or UDP header. The two
    header words read here (as decode_tcp reads them) are kept for the TCP decoding."""
    at = views.safe(offset)
    word0, word6 = views.be32[at], views.be32[at + 6]
    step.word0[rows], step.word6[rows], step.has_words[rows] = word0, word6, True
    version = word0 >> 28
    protocol = np.full(len(rows), -1, dtype=np.int64)
    upper = offset.copy()
    v4 = (state == ETHERTYPE_IPV4) & (version == 4) & (((word6 >> 16) & 0x1FFF) == 0)  # first fragments
    protocol[v4] = word6[v4] & 0xFF
    upper[v4] = offset[v4] + ((word0[v4] >> 24) & 0x0F).astype(np.int64) * 4
    v6 = np.flatnonzero((state == ETHERTYPE_IPV6) & (version == 6))
    if len(v6):
        next_header, upper_v6, later = ipv6_upper_layer(views, offset[v6])
        protocol[v6] = np.where(later, -1, next_header)
        upper[v6] = upper_v6
    for number, to_state, kind, header_bytes in ((4, ETHERTYPE_IPV4, KIND_IP_IN_IP, 20),
                                                 (41, ETHERTYPE_IPV6, KIND_IPV6_IN_IP, 40),
                                                 (47, STATE_GRE, 0, 4), (17, STATE_UDP, 0, 8)):
        match = protocol == number
        if match.any():
            step.go(rows[match], to_state, upper[match], kind, header_bytes)


def _peel_udp(views: Views, step: _Step, rows, offset) -> None:
    # Destination port (bytes 2-3) and the tunnel header's first byte (8) in one load.
    head = views.be64[views.safe(offset + 2)]
    port = (head >> np.uint64(48)).astype(np.int64)
    flags = ((head >> np.uint64(8)) & np.uint64(0xFF)).astype(np.int64)
    vxlan = (port == UDP_PORT_VXLAN) & ((flags & 0x08) != 0)
    step.go(rows[vxlan], ETHERTYPE_TRANSPARENT_ETHERNET, offset[vxlan] + 16, KIND_VXLAN, 14)
    geneve = (port == UDP_PORT_GENEVE) & ((flags >> 6) == 0)
    if geneve.any():
        at = offset[geneve]
        inner = at + 16 + (flags[geneve] & 0x3F).astype(np.int64) * 4
        protocol = views.be16[views.safe(at + 10)].astype(np.int64)
        known = ((protocol == ETHERTYPE_TRANSPARENT_ETHERNET) | (protocol == ETHERTYPE_IPV4)
                 | (protocol == ETHERTYPE_IPV6))
        step.go(rows[geneve][known], protocol[known], inner[known], KIND_GENEVE, 14)
        step.stop(rows[geneve][~known], CATEGORY_GENEVE_PROTOCOL, protocol[~known])
    # Plain UDP: a packet that is simply not TCP.
    step.stop(rows[~vxlan & ~geneve], CATEGORY_IP_PROTOCOL, 17)


def _peel_ethernet(views: Views, step: _Step, rows, offset) -> None:
    inner_kind, inner_offset = ethernet_payload(views, views.safe(offset))
    step.go(rows, inner_kind, inner_offset)


def _peel_pppoe(views: Views, step: _Step, rows, offset) -> None:
    ppp = views.be16[views.safe(offset + 6)].astype(np.int64)
    v4, v6 = ppp == 0x0021, ppp == 0x0057
    step.go(rows[v4], ETHERTYPE_IPV4, offset[v4] + 8, KIND_PPPOE, 20)
    step.go(rows[v6], ETHERTYPE_IPV6, offset[v6] + 8, KIND_PPPOE, 40)
    other = ~v4 & ~v6
    step.stop(rows[other], CATEGORY_PPP_PROTOCOL, ppp[other])


def _peel_gre(views: Views, step: _Step, rows, offset) -> None:
    be16 = views.be16
    at = views.safe(offset)
    flags = be16[at].astype(np.int64)
    protocol = be16[at + 2].astype(np.int64)
    version = flags & 0x7
    # RFC 2784/2890 fields that follow the 4 fixed bytes: checksum+reserved (C), key (K),
    # sequence number (S). Routing (R, RFC 1701) and version 1 (PPTP) are not read.
    payload = offset + 4 + 4 * (((flags >> 15) & 1) + ((flags >> 13) & 1) + ((flags >> 12) & 1))
    readable = (version == 0) & ((flags & 0x4000) == 0)
    known = np.zeros(len(rows), dtype=bool)

    def go(match, to_state, to_offset, header_bytes, kind=KIND_GRE):
        match = readable & match
        known[match] = True
        step.go(rows[match], to_state if np.isscalar(to_state) else to_state[match], to_offset[match], kind,
                header_bytes)

    go(protocol == ETHERTYPE_IPV4, ETHERTYPE_IPV4, payload, 20)
    go(protocol == ETHERTYPE_IPV6, ETHERTYPE_IPV6, payload, 40)
    go(protocol == ETHERTYPE_TRANSPARENT_ETHERNET, ETHERTYPE_TRANSPARENT_ETHERNET, payload, 14)
    go((protocol == ETHERTYPE_MPLS[0]) | (protocol == ETHERTYPE_MPLS[1]), protocol, payload, 4)
    # ERSPAN: type I has no sequence number and no header of its own; type II an 8-byte
    # header; type III a 12-byte one plus an 8-byte platform sub-header when its O bit is set.
    with_sequence = ((flags >> 12) & 1) == 1
    go(protocol == ETHERTYPE_ERSPAN_2, ETHERTYPE_TRANSPARENT_ETHERNET, np.where(with_sequence, payload + 8, payload),
       14, KIND_ERSPAN)
    erspan_3 = protocol == ETHERTYPE_ERSPAN_3
    if erspan_3.any():
        subheader = (views.u8[views.safe(payload + 11)] & 1).astype(np.int64) * 8
        go(erspan_3, ETHERTYPE_TRANSPARENT_ETHERNET, payload + 12 + subheader, 14, KIND_ERSPAN)
    unknown = readable & ~known
    step.stop(rows[unknown], CATEGORY_GRE_PROTOCOL, protocol[unknown])
    unread = ~readable
    step.stop(rows[unread], CATEGORY_GRE_VERSION, np.where(flags[unread] & 0x4000, 0x100, version[unread]))


def _peel_mpls(views: Views, step: _Step, rows, offset) -> None:
    label = offset.copy()
    bottom = np.zeros(len(rows), dtype=bool)
    for _ in range(MAXIMUM_MPLS_LABELS):
        bottom_here = ~bottom & ((views.u8[views.safe(label + 2)] & 1) == 1)
        label = np.where(bottom, label, label + 4)
        bottom |= bottom_here
        if bottom.all():
            break
    # The payload has no type field: IP says so in its version nibble; an Ethernet pseudowire
    # (RFC 4448) usually starts with a zero control word.
    nibble = (views.u8[views.safe(label)] >> 4).astype(np.int64)
    for match, to_state, to_offset, header_bytes in (
            (bottom & (nibble == 4), ETHERTYPE_IPV4, label, 20), (bottom & (nibble == 6), ETHERTYPE_IPV6, label, 40),
            (bottom & (nibble == 0), ETHERTYPE_TRANSPARENT_ETHERNET, label + 4, 14)):
        step.go(rows[match], to_state, to_offset[match], KIND_MPLS, header_bytes)
    other = ~(bottom & ((nibble == 0) | (nibble == 4) | (nibble == 6)))
    step.stop(rows[other], CATEGORY_MPLS_PAYLOAD, np.where(bottom[other], nibble[other], 0x100))


def chain_name(chain: int) -> str:
    """'mpls+gre' for a chain code (outermost first); '' for none."""
    names = []
    while chain:
        names.append(KIND_NAMES.get(chain & 0xF, "?"))
        chain >>= 4
    return "+".join(names)


# -- what was not decoded ---------------------------------------------------------------------

def reason_keys(views: Views, state: np.ndarray, l3: np.ndarray, captured_end: np.ndarray) -> np.ndarray:
    """A (category << 32 | value) key per packet that is not TCP, saying why."""
    keys = state.astype(np.int64).copy()
    at = views.safe(l3)
    version = (views.u8[at] >> 4).astype(np.int64)
    v4 = state == ETHERTYPE_IPV4
    v6 = state == ETHERTYPE_IPV6
    wrong = (v4 & (version != 4)) | (v6 & (version != 6))
    keys[wrong] = (CATEGORY_IP_VERSION << 32) | version[wrong]
    v4 &= ~wrong
    v6 &= ~wrong
    if v4.any():
        protocol = views.u8[at + 9].astype(np.int64)
        fragment = (views.be16[at + 6] & 0x1FFF) != 0
        header_end = l3 + np.maximum((views.u8[at] & 0x0F).astype(np.int64) * 4, 20) + 14
        _ip_keys(keys, v4, protocol, fragment, header_end > captured_end)
    if v6.any():
        rows = np.flatnonzero(v6)
        next_header, upper, later = ipv6_upper_layer(views, l3[rows])
        mask = np.zeros(len(state), dtype=bool)
        mask[rows] = True
        protocol = np.zeros(len(state), dtype=np.int64)
        fragment = np.zeros(len(state), dtype=bool)
        cut = np.zeros(len(state), dtype=bool)
        protocol[rows], fragment[rows], cut[rows] = next_header, later, upper + 14 > captured_end[rows]
        _ip_keys(keys, mask, protocol, fragment, cut)
    return keys


def _ip_keys(keys, mask, protocol, fragment, cut) -> None:
    tcp = protocol == IP_PROTOCOL_TCP
    keys[mask] = (CATEGORY_IP_PROTOCOL << 32) | protocol[mask]
    later = mask & fragment
    keys[later] = (CATEGORY_FRAGMENT << 32) | protocol[later]
    # TCP whose header is not all there (snap length, bad IHL or data offset).
    short = mask & ~fragment & tcp
    keys[short] = np.where(cut[short], CATEGORY_CUT << 32, (CATEGORY_IP_PROTOCOL << 32) | IP_PROTOCOL_TCP)


def describe(key: int) -> tuple[str, bool]:
    """(what the packets were, True when they may hide TCP the analysis did not see)."""
    category, value = key >> 32, key & 0xFFFFFFFF
    if category == CATEGORY_ETHERTYPE:
        if value < 0x0600:
            return "IEEE 802.3 frames with a length field (LLC: STP, CDP...)", False
        name = ETHERTYPE_NAMES.get(value)
        return f"ethertype 0x{value:04x}" + (f" ({name})" if name else ""), value not in ETHERTYPES_NOT_TCP
    if category == CATEGORY_IP_PROTOCOL:
        if value == IP_PROTOCOL_TCP:
            return "TCP with an invalid header length", True
        name = IP_PROTOCOL_NAMES.get(value)
        return f"IP protocol {value}" + (f" ({name})" if name else ""), value not in IP_PROTOCOLS_NOT_TCP
    if category == CATEGORY_FRAGMENT:
        name = IP_PROTOCOL_NAMES.get(value, "TCP" if value == IP_PROTOCOL_TCP else f"protocol {value}")
        # Fragments of a tunnel may hold TCP as much as fragments of TCP itself.
        hidden = value in (IP_PROTOCOL_TCP, 4, 41, 47) or value not in IP_PROTOCOLS_NOT_TCP
        return f"IP fragments of {name} after the first (not reassembled)", hidden
    if category == CATEGORY_CUT:
        where = f" inside {KIND_NAMES[value]}" if value in KIND_NAMES else ""
        return f"headers cut by the snap length{where}", True
    if category == CATEGORY_LINKTYPE:
        from probes.pcap_reader import linktype_name

        return f"link type {value} ({linktype_name(value)}), not supported", True
    if category == CATEGORY_GRE_PROTOCOL:
        return f"GRE carrying protocol 0x{value:04x}", True
    if category == CATEGORY_GRE_VERSION:
        return ("GRE with source routing (RFC 1701)" if value == 0x100 else f"GRE version {value}"
                + (" (PPTP)" if value == 1 else "")), True
    if category == CATEGORY_GENEVE_PROTOCOL:
        return f"Geneve carrying protocol 0x{value:04x}", True
    if category == CATEGORY_MPLS_PAYLOAD:
        return ("MPLS label stack deeper than 8 labels" if value == 0x100
                else f"MPLS payload starting with nibble {value} (not IP)"), True
    if category == CATEGORY_PPP_PROTOCOL:
        return f"PPPoE session carrying PPP protocol 0x{value:04x}", value not in PPP_PROTOCOLS_NOT_TCP
    if category == CATEGORY_TOO_DEEP:
        return f"more than {MAXIMUM_LAYERS} nested encapsulations", True
    if category == CATEGORY_IP_VERSION:
        return f"IP header with version {value}", True
    if category == CATEGORY_ADDRESS_FAMILY:
        return f"loopback packets of address family {value} (not IP)", True
    return f"unknown ({key:#x})", True


def count_reasons(keys: np.ndarray) -> tuple[dict[str, int], dict[str, int]]:
    """(not TCP, not decoded): packet counts by description."""
    not_tcp: dict[str, int] = {}
    not_decoded: dict[str, int] = {}
    if not len(keys):
        return not_tcp, not_decoded
    values, counts = np.unique(keys, return_counts=True)
    for key, count in zip(values.tolist(), counts.tolist()):
        text, hidden = describe(key)
        target = not_decoded if hidden else not_tcp
        target[text] = target.get(text, 0) + count
    return not_tcp, not_decoded


def count_chains(chain: np.ndarray) -> dict[str, int]:
    """TCP packets per encapsulation chain (plain packets left out)."""
    wrapped = chain[chain > 0]
    if not len(wrapped):
        return {}
    values, counts = np.unique(wrapped, return_counts=True)
    return {chain_name(value): count for value, count in zip(values.tolist(), counts.tolist())}


def add_counts(total: dict[str, int], more: dict[str, int]) -> None:
    for name, count in more.items():
        total[name] = total.get(name, 0) + count


def not_decoded_findings(not_decoded: dict[str, int], packets: int, subject: str, probe: str) -> list[dict]:
    """One finding per reason that holds a significant share of the packets."""
    from probes.base import finding

    rows = []
    for text, count in sorted(not_decoded.items(), key=lambda item: -item[1]):
        share = count / packets if packets else 0.0
        if share < NOT_DECODED_FINDING_SHARE:
            continue
        rows.append(finding(
            probe, "warning" if share >= 0.1 else "info", subject,
            f"{count:,} packets ({100 * share:.0f}%) not decoded: {text}",
            "flows and turns leave these packets out: capture outside the tunnel or before "
            "encryption, with a longer snap length, or on an interface of a supported link type"))
    return rows
