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


def unwrap(views: Views, ethertype: np.ndarray, l3: np.ndarray, captured_end: np.ndarray,
           rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Peel encapsulations off `rows`. Returns the new state (ethertype or category state) and
    network offset of those rows, and their encapsulation chains (0 = none)."""
    state = ethertype[rows].astype(np.int64)
    offset = l3[rows].astype(np.int64)
    end = captured_end[rows]
    chain = np.zeros(len(rows), dtype=np.int64)
    depth = np.zeros(len(rows), dtype=np.int64)
    active = np.arange(len(rows))
    for _ in range(MAXIMUM_STEPS + 1):
        if not len(active):
            break
        new_state, new_offset, kind, moved = _peel(views, state[active], offset[active], end[active])
        state[active], offset[active] = new_state, new_offset
        layered = kind > 0
        chain[active[layered]] |= kind[layered] << (4 * depth[active[layered]])
        depth[active[layered]] += 1
        active = active[moved]
    if len(active):
        state[active] = (CATEGORY_TOO_DEEP << 32) | (state[active] & 0xFFFF)
    return state, offset, chain


def _peel(views: Views, state: np.ndarray, offset: np.ndarray, end: np.ndarray):
    """One layer off each packet: (state, offset, kind of the layer removed or 0, moved)."""
    u8, be16, be32 = views.u8, views.be16, views.be32
    new_state, new_offset = state.copy(), offset.copy()
    kind = np.zeros(len(state), dtype=np.int64)
    moved = np.zeros(len(state), dtype=bool)

    def go(mask, to_state, to_offset, layer_kind=0, header_bytes=0):
        """Rows of `mask` move on, unless the header they need was cut by the snap length."""
        to_state = np.broadcast_to(to_state, state.shape)
        to_offset = np.broadcast_to(to_offset, state.shape)
        cut = mask & (to_offset + header_bytes > end)
        fine = mask & ~cut
        new_state[fine], new_offset[fine] = to_state[fine], to_offset[fine]
        new_state[cut] = (CATEGORY_CUT << 32) | layer_kind
        kind[mask] = layer_kind
        moved[fine] = True

    at = views.safe(offset)
    # IPv4 and IPv6 carrying a tunnel protocol.
    v4 = (state == ETHERTYPE_IPV4) & ((u8[at] >> 4) == 4)
    v6 = (state == ETHERTYPE_IPV6) & ((u8[at] >> 4) == 6)
    protocol = np.full(len(state), -1, dtype=np.int64)
    upper = offset.copy()
    if v4.any():
        first_fragment = (be16[at + 6] & 0x1FFF) == 0
        v4 &= first_fragment
        protocol = np.where(v4, u8[at + 9], protocol)
        upper = np.where(v4, offset + (u8[at] & 0x0F).astype(np.int64) * 4, upper)
    if v6.any():
        rows_v6 = np.flatnonzero(v6)
        next_header, upper_v6, later = ipv6_upper_layer(views, offset[rows_v6])
        protocol[rows_v6] = np.where(later, -1, next_header)
        upper[rows_v6] = upper_v6
    go(protocol == 4, ETHERTYPE_IPV4, upper, KIND_IP_IN_IP, 20)
    go(protocol == 41, ETHERTYPE_IPV6, upper, KIND_IPV6_IN_IP, 40)
    go(protocol == 47, STATE_GRE, upper, 0, 4)
    go(protocol == 17, STATE_UDP, upper, 0, 8)

    if (state == STATE_GRE).any():
        _peel_gre(views, state, offset, go, new_state)
    udp = state == STATE_UDP
    if udp.any():
        port = be16[views.safe(offset + 2)].astype(np.int64)
        vxlan = udp & (port == UDP_PORT_VXLAN) & ((u8[views.safe(offset + 8)] & 0x08) != 0)
        go(vxlan, ETHERTYPE_TRANSPARENT_ETHERNET, offset + 16, KIND_VXLAN, 14)
        geneve = udp & (port == UDP_PORT_GENEVE) & ((u8[views.safe(offset + 8)] >> 6) == 0)
        if geneve.any():
            inner = offset + 16 + (u8[views.safe(offset + 8)] & 0x3F).astype(np.int64) * 4
            geneve_protocol = be16[views.safe(offset + 10)].astype(np.int64)
            known = np.isin(geneve_protocol, (ETHERTYPE_TRANSPARENT_ETHERNET, ETHERTYPE_IPV4, ETHERTYPE_IPV6))
            go(geneve & known, geneve_protocol, inner, KIND_GENEVE, 14)
            unknown = geneve & ~known
            new_state[unknown] = (CATEGORY_GENEVE_PROTOCOL << 32) | geneve_protocol[unknown]
        # Plain UDP: a packet that is simply not TCP.
        plain = udp & ~vxlan & ~geneve
        new_state[plain] = (CATEGORY_IP_PROTOCOL << 32) | 17
    inner_ethernet = state == ETHERTYPE_TRANSPARENT_ETHERNET
    if inner_ethernet.any():
        inner_kind, inner_offset = ethernet_payload(views, offset)
        go(inner_ethernet, inner_kind, inner_offset, 0, 0)
    mpls = np.isin(state, ETHERTYPE_MPLS)
    if mpls.any():
        _peel_mpls(views, offset, mpls, go, new_state)
    pppoe = state == ETHERTYPE_PPPOE_SESSION
    if pppoe.any():
        ppp = be16[views.safe(offset + 6)].astype(np.int64)
        go(pppoe & (ppp == 0x0021), ETHERTYPE_IPV4, offset + 8, KIND_PPPOE, 20)
        go(pppoe & (ppp == 0x0057), ETHERTYPE_IPV6, offset + 8, KIND_PPPOE, 40)
        other = pppoe & (ppp != 0x0021) & (ppp != 0x0057)
        new_state[other] = (CATEGORY_PPP_PROTOCOL << 32) | ppp[other]
    del be32
    return new_state, new_offset, kind, moved


def _peel_gre(views: Views, state, offset, go, new_state) -> None:
    be16 = views.be16
    gre = state == STATE_GRE
    at = views.safe(offset)
    flags = be16[at].astype(np.int64)
    protocol = be16[at + 2].astype(np.int64)
    version = flags & 0x7
    # RFC 2784/2890 fields that follow the 4 fixed bytes: checksum+reserved (C), key (K),
    # sequence number (S). Routing (R, RFC 1701) and version 1 (PPTP) are not read.
    header = 4 + 4 * (((flags >> 15) & 1) + ((flags >> 13) & 1) + ((flags >> 12) & 1))
    readable = gre & (version == 0) & ((flags & 0x4000) == 0)
    payload = offset + header
    go(readable & (protocol == ETHERTYPE_IPV4), ETHERTYPE_IPV4, payload, KIND_GRE, 20)
    go(readable & (protocol == ETHERTYPE_IPV6), ETHERTYPE_IPV6, payload, KIND_GRE, 40)
    go(readable & (protocol == ETHERTYPE_TRANSPARENT_ETHERNET), ETHERTYPE_TRANSPARENT_ETHERNET, payload,
       KIND_GRE, 14)
    mpls = readable & np.isin(protocol, ETHERTYPE_MPLS)
    go(mpls, protocol, payload, KIND_GRE, 4)
    # ERSPAN: type I has no sequence number and no header of its own; type II an 8-byte
    # header; type III a 12-byte one plus an 8-byte platform sub-header when its O bit is set.
    erspan_2 = readable & (protocol == ETHERTYPE_ERSPAN_2)
    with_sequence = ((flags >> 12) & 1) == 1
    go(erspan_2, ETHERTYPE_TRANSPARENT_ETHERNET, np.where(with_sequence, payload + 8, payload), KIND_ERSPAN, 14)
    erspan_3 = readable & (protocol == ETHERTYPE_ERSPAN_3)
    if erspan_3.any():
        subheader = (views.u8[views.safe(payload + 11)] & 1).astype(np.int64) * 8
        go(erspan_3, ETHERTYPE_TRANSPARENT_ETHERNET, payload + 12 + subheader, KIND_ERSPAN, 14)
    known = (protocol == ETHERTYPE_IPV4) | (protocol == ETHERTYPE_IPV6) | (
        protocol == ETHERTYPE_TRANSPARENT_ETHERNET) | mpls | erspan_2 | erspan_3
    unknown = readable & ~known
    new_state[unknown] = (CATEGORY_GRE_PROTOCOL << 32) | protocol[unknown]
    unread = gre & ~readable
    new_state[unread] = (CATEGORY_GRE_VERSION << 32) | np.where(flags[unread] & 0x4000, 0x100, version[unread])


def _peel_mpls(views: Views, offset, mpls, go, new_state) -> None:
    label = offset.copy()
    bottom = np.zeros(len(offset), dtype=bool)
    for _ in range(MAXIMUM_MPLS_LABELS):
        bottom_here = ~bottom & ((views.u8[views.safe(label + 2)] & 1) == 1)
        label = np.where(bottom, label, label + 4)
        bottom |= bottom_here
        if bottom[mpls].all():
            break
    # The payload has no type field: IP says so in its version nibble; an Ethernet pseudowire
    # (RFC 4448) usually starts with a zero control word.
    nibble = (views.u8[views.safe(label)] >> 4).astype(np.int64)
    stacked = mpls & bottom
    go(stacked & (nibble == 4), ETHERTYPE_IPV4, label, KIND_MPLS, 20)
    go(stacked & (nibble == 6), ETHERTYPE_IPV6, label, KIND_MPLS, 40)
    go(stacked & (nibble == 0), ETHERTYPE_TRANSPARENT_ETHERNET, label + 4, KIND_MPLS, 14)
    other = mpls & ~(stacked & np.isin(nibble, (0, 4, 6)))
    new_state[other] = (CATEGORY_MPLS_PAYLOAD << 32) | np.where(bottom[other], nibble[other], 0x100)


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
