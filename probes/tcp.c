// tcp probe: per-connection TCP timings aggregated in the kernel (tracepoints only).
//
// Method: one hash entry per socket (keyed by the socket's kernel address, which tracepoints
// expose as an opaque value) updated by
//   sock:inet_sock_set_state  connect start (SYN_SENT/SYN_RECV), established, close
//   tcp:tcp_probe             smoothed RTT (already in us), bytes received (data_len),
//                             bytes sent (snd_nxt growth)
//   tcp:tcp_retransmit_skb, tcp:tcp_receive_reset, tcp:tcp_send_reset  counters
// Nothing per packet leaves the kernel: a closed connection's entry is copied once into a ring
// buffer and deleted; open ones are read from the map at the end of the window.
//
// Only tracepoint arguments and BPF helpers are read: no kernel struct is dereferenced, so the
// program does not depend on the (possibly borrowed) kernel headers' struct layouts.

// tcp_send_reset's format names `enum sk_rst_reason` (kernel 6.10+), which older (borrowed)
// headers lack; BCC builds the argument struct from the format, so give the enum a body.
// The field is 4 bytes either way and this program does not read it.
enum sk_rst_reason { SK_RST_REASON_UNREAD = 0 };

#define SRTT_SLOTS 128  // a power of two: the index is masked for the verifier
#define COMM_BYTES 16
#define FAMILY_INET 2
#define FAMILY_INET6 10
#define PROTOCOL_TCP 6
#define STATE_ESTABLISHED 1
#define STATE_SYN_SENT 2
#define STATE_SYN_RECV 3
#define STATE_CLOSE 7
#define STATE_LISTEN 10

struct connection_t {
    u64 first_ns;
    u64 connect_start_ns;
    u64 established_ns;
    u64 closed_ns;
    u64 last_ns;
    u64 bytes_received;
    u64 bytes_sent;
    u64 srtt_sum_us;
    u64 srtt_samples;
    u32 pid;
    u32 srtt_min_us;
    u32 srtt_max_us;
    u32 snd_nxt_last;
    u32 retransmits;
    u32 resets_received;
    u32 resets_sent;
    u16 family;
    u16 lport;
    u16 rport;
    u8 active;
    u8 state;
    u8 sequence_seen;
    u8 padding[3];
    u8 laddr[16];
    u8 raddr[16];
    char comm[COMM_BYTES];
    u32 srtt_slots[SRTT_SLOTS];
};

// MAX_CONNECTIONS: the tcp_max_connections option (tcp.py), one entry per socket end.
BPF_HASH(connections, u64, struct connection_t, MAX_CONNECTIONS);
// A zeroed template in map memory: the entry is too large for the 512-byte BPF stack.
BPF_ARRAY(template_entry, struct connection_t, 1);
// 16 MiB: ~24,000 closed connections (20,000 socket ends: 10,000 loopback connections closing
// at once) before the reader catches up; past that each lost close is counted (status partial).
BPF_RINGBUF_OUTPUT(closed_connections, 4096);
// 0: connections not tracked (table full), 1: closed connections lost (ring buffer full)
BPF_ARRAY(lost, u64, 2);

static __always_inline u32 floor_log2(u32 value) {
    u32 result = (value > 0xFFFF) << 4;
    value >>= result;
    u32 shift = (value > 0xFF) << 3;
    value >>= shift;
    result |= shift;
    shift = (value > 0xF) << 2;
    value >>= shift;
    result |= shift;
    shift = (value > 0x3) << 1;
    value >>= shift;
    result |= shift;
    result |= (value >> 1);
    return result;
}

// Log-linear slots: values 0..3 exactly, then 4 slots per power of two (<= 25% wide).
static __always_inline u32 srtt_slot(u32 value_us) {
    if (value_us < 4)
        return value_us;
    u32 power = floor_log2(value_us);
    u32 slot = (power - 1) * 4 + ((value_us >> (power - 2)) & 3);
    return slot < SRTT_SLOTS ? slot : SRTT_SLOTS - 1;
}

static __always_inline void count_lost(int index) {
    u64 *counter = lost.lookup(&index);
    if (counter)
        __sync_fetch_and_add(counter, 1);
}

static __always_inline struct connection_t *find_or_create(u64 socket) {
    struct connection_t *entry = connections.lookup(&socket);
    if (entry)
        return entry;
    int zero = 0;
    struct connection_t *empty = template_entry.lookup(&zero);
    if (!empty)
        return 0;
    if (connections.insert(&socket, empty) != 0) {
        count_lost(0);
        return 0;
    }
    return connections.lookup(&socket);
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != PROTOCOL_TCP)
        return 0;
    int old_state = args->oldstate;
    int new_state = args->newstate;
    if (old_state == STATE_LISTEN || new_state == STATE_LISTEN)
        return 0;
    u64 socket = (u64)args->skaddr;
    u64 now = bpf_ktime_get_ns();
    struct connection_t *entry;
    if (new_state == STATE_CLOSE) {
        entry = connections.lookup(&socket);
        if (!entry)
            return 0;
        entry->closed_ns = now;
        entry->last_ns = now;
        entry->state = new_state;
        if (closed_connections.ringbuf_output(entry, sizeof(*entry), 0) != 0)
            count_lost(1);
        connections.delete(&socket);
        return 0;
    }
    entry = find_or_create(socket);
    if (!entry)
        return 0;
    if (entry->first_ns == 0)
        entry->first_ns = now;
    if (new_state == STATE_SYN_SENT) {
        // connect() runs in the caller's context: the only place the owner is certain.
        entry->connect_start_ns = now;
        entry->active = 1;
        entry->pid = bpf_get_current_pid_tgid() >> 32;
        bpf_get_current_comm(&entry->comm, sizeof(entry->comm));
    } else if (new_state == STATE_SYN_RECV && entry->connect_start_ns == 0) {
        entry->connect_start_ns = now;
    } else if (new_state == STATE_ESTABLISHED && entry->established_ns == 0) {
        entry->established_ns = now;
    }
    entry->state = new_state;
    entry->last_ns = now;
    entry->family = args->family;
    // The local port is chosen after SYN_SENT is set: refresh the endpoints on every change.
    entry->lport = args->sport;
    entry->rport = args->dport;
    if (args->family == FAMILY_INET) {
        __builtin_memcpy(entry->laddr, args->saddr, 4);
        __builtin_memcpy(entry->raddr, args->daddr, 4);
    } else {
        __builtin_memcpy(entry->laddr, args->saddr_v6, 16);
        __builtin_memcpy(entry->raddr, args->daddr_v6, 16);
    }
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_probe) {
    u64 socket = (u64)args->skaddr;
    struct connection_t *entry = find_or_create(socket);
    if (!entry)
        return 0;
    u64 now = bpf_ktime_get_ns();
    if (entry->first_ns == 0)
        entry->first_ns = now;  // connected before the probe attached
    if (entry->lport == 0) {
        // saddr/daddr are sockaddr_in / sockaddr_in6: address at byte 4 / byte 8.
        entry->family = args->family;
        entry->lport = args->sport;
        entry->rport = args->dport;
        if (args->family == FAMILY_INET) {
            __builtin_memcpy(entry->laddr, &args->saddr[4], 4);
            __builtin_memcpy(entry->raddr, &args->daddr[4], 4);
        } else {
            __builtin_memcpy(entry->laddr, &args->saddr[8], 16);
            __builtin_memcpy(entry->raddr, &args->daddr[8], 16);
        }
    }
    // Bytes sent = growth of snd_nxt between received segments, plus what was in flight when
    // the connection was first seen (snd_una is read before this segment's ACK is processed,
    // so at the first segment after the handshake it is still the initial sequence + 1).
    u32 next_to_send = args->snd_nxt;
    if (entry->sequence_seen) {
        u32 delta = next_to_send - entry->snd_nxt_last;  // modulo 2^32: survives wrap-around
        if (delta < 0x80000000)
            entry->bytes_sent += delta;
    } else {
        u32 in_flight = next_to_send - args->snd_una;
        if (in_flight < 0x80000000)
            entry->bytes_sent = in_flight;
    }
    entry->sequence_seen = 1;
    entry->snd_nxt_last = next_to_send;
    entry->bytes_received += args->data_len;
    u32 srtt_us = args->srtt;
    if (srtt_us) {
        u32 slot = srtt_slot(srtt_us) & (SRTT_SLOTS - 1);
        entry->srtt_slots[slot] += 1;
        entry->srtt_sum_us += srtt_us;
        entry->srtt_samples += 1;
        if (entry->srtt_min_us == 0 || srtt_us < entry->srtt_min_us)
            entry->srtt_min_us = srtt_us;
        if (srtt_us > entry->srtt_max_us)
            entry->srtt_max_us = srtt_us;
    }
    entry->last_ns = now;
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_retransmit_skb) {
    u64 socket = (u64)args->skaddr;
    struct connection_t *entry = connections.lookup(&socket);
    if (entry)
        __sync_fetch_and_add(&entry->retransmits, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_receive_reset) {
    u64 socket = (u64)args->skaddr;
    struct connection_t *entry = connections.lookup(&socket);
    if (entry)
        __sync_fetch_and_add(&entry->resets_received, 1);
    return 0;
}

TRACEPOINT_PROBE(tcp, tcp_send_reset) {
    u64 socket = (u64)args->skaddr;
    if (socket == 0)
        return 0;  // a reset for a segment with no socket
    struct connection_t *entry = connections.lookup(&socket);
    if (entry)
        __sync_fetch_and_add(&entry->resets_sent, 1);
    return 0;
}
