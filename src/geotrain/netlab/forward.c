/* The network lab's data plane in C: the same links as geotrain/netlab/router.py's Python loop, at over twice
 * its rate (4 sites all sending: 1,458 against 657 Mbit/s on a 2-core machine; the lab's 4-site all-to-all at
 * 100 Mbit/s needs 1,200; benchmarks/netlab_router_bench.py).
 *
 * The Python router opens every site's TUN device, then replaces itself with this program (execv), handing it
 * the descriptors. Each directed link is what router.py's _Pipe is, with the same arithmetic in the same
 * order of double operations, so both give identical delivery times (tests/netlab checks it with --replay):
 *
 *   a FIFO queue of QUEUE bytes (tail drop); serialisation at BW bit/s; the packet is written to the
 *   destination's device LAT seconds after it left the queue; optionally random loss (a seeded generator).
 *
 * A link's packets leave in the order they came, each LAT after its serialisation ends, so every link is a
 * FIFO ring of packets in flight and no heap is needed.
 *
 *   forward OWNER SEED P0 P1 P2 N FD0 .. FD(N-1) L  A B BW LAT LOSS QUEUE  (L times)
 *       forward between the N devices until OWNER is gone, stdin ends, or SIGTERM/SIGINT. P0.P1.P2 is the first
 *       three bytes of every site's address (site k is P0.P1.P2.(k+1)). Commands on stdin, one a line:
 *       "partition K", "heal K", "slow K FACTOR", each answered "ok" or "error: ..." on stdout. Prints
 *       "ready" once set up and, at the end, {"router_stats": {"A->B": {"packets", "bytes", "dropped"}}}.
 *   forward --replay BW LAT QUEUE
 *       no devices: two sites joined by one link each way; reads lines "offer NOW SIZE" (a packet from site 0
 *       to site 1 at time NOW) and commands as above; prints each offer's delivery time (%.17g) or "drop".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <math.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_SITES 64
#define MAX_READS_PER_WAKE 256 /* packets read from one device before the others get their turn */
#define OWNER_POLL_S 0.5       /* longest time between two checks that the owner still lives */
#define MAX_WAIT_S 0.2         /* longest wait when nothing is due */
#define MAX_PACKET 65536

typedef struct {
    double at; /* delivery time */
    int len;
    unsigned char *data;
} packet_t;

typedef struct {
    double bw, nominal, lat, loss, busy_until;
    double queue;
    int cut, used;
    unsigned long long packets, bytes, dropped;
    packet_t *ring; /* packets in flight, oldest at head */
    size_t cap, head, count;
} pipe_t;

static pipe_t pipes[MAX_SITES][MAX_SITES];
static int sites;
static int cut_site[MAX_SITES];
static double slow_site[MAX_SITES];
static uint64_t rng_state;
static volatile sig_atomic_t stopping;

static void on_signal(int sig) { (void)sig; stopping = 1; }

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double uniform(void) { /* splitmix64, top 53 bits */
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    z ^= z >> 31;
    return (double)(z >> 11) * 0x1.0p-53;
}

/* router.py's _Pipe.admit: the delivery time of a SIZE-byte packet offered at NOW, or -1 when it is dropped. */
static double admit(pipe_t *p, double now, int size) {
    double backlog = (p->busy_until - now > 0.0 ? p->busy_until - now : 0.0) * p->bw / 8.0;
    if (p->cut || backlog + size > p->queue || (p->loss != 0.0 && uniform() < p->loss)) {
        p->dropped++;
        return -1.0;
    }
    double start = now >= p->busy_until ? now : p->busy_until;
    p->busy_until = start + 8.0 * size / p->bw;
    p->packets++;
    p->bytes += (unsigned long long)size;
    return p->busy_until + p->lat;
}

static int push(pipe_t *p, double at, const unsigned char *data, int len) {
    if (p->count == p->cap) {
        size_t cap = p->cap ? 2 * p->cap : 64;
        packet_t *ring = malloc(cap * sizeof *ring);
        if (!ring) return -1;
        for (size_t i = 0; i < p->count; i++) ring[i] = p->ring[(p->head + i) % p->cap];
        free(p->ring);
        p->ring = ring, p->cap = cap, p->head = 0;
    }
    unsigned char *copy = malloc((size_t)len);
    if (!copy) return -1;
    memcpy(copy, data, (size_t)len);
    p->ring[(p->head + p->count) % p->cap] = (packet_t){at, len, copy};
    p->count++;
    return 0;
}

/* router.py's Conditions.apply: set every link from the cut sites and the slow factors. Returns an error or NULL. */
static const char *command(const char *line, char *err, size_t errlen) {
    char op[32];
    int site;
    double factor = 1.0;
    int n = sscanf(line, "%31s %d %lf", op, &site, &factor);
    if (n < 2) {
        snprintf(err, errlen, "expected OP SITE [FACTOR], got %.60s", line);
        return err;
    }
    if (site < 0 || site >= sites) {
        snprintf(err, errlen, "no site %d", site);
        return err;
    }
    if (!strcmp(op, "partition")) {
        cut_site[site] = 1;
    } else if (!strcmp(op, "heal")) {
        cut_site[site] = 0;
    } else if (!strcmp(op, "slow")) {
        if (n < 3 || !(factor >= 1.0)) {
            snprintf(err, errlen, "a slow factor must be at least 1, got %.40s", n < 3 ? "none" : line);
            return err;
        }
        slow_site[site] = factor;
    } else {
        snprintf(err, errlen, "unknown op '%.31s'", op);
        return err;
    }
    for (int a = 0; a < sites; a++)
        for (int b = 0; b < sites; b++) {
            pipe_t *p = &pipes[a][b];
            if (!p->used) continue;
            p->cut = cut_site[a] || cut_site[b];
            p->bw = p->nominal / (slow_site[a] >= slow_site[b] ? slow_site[a] : slow_site[b]);
        }
    return NULL;
}

static void answer(const char *line) {
    char err[160];
    const char *e = command(line, err, sizeof err);
    if (e) printf("error: %s\n", e); else printf("ok\n");
    fflush(stdout);
}

static void setup(int a, int b, double bw, double lat, double loss, double queue) {
    pipe_t *p = &pipes[a][b];
    p->bw = p->nominal = bw, p->lat = lat, p->loss = loss, p->queue = queue, p->used = 1;
}

static int replay(int argc, char **argv) {
    if (argc != 5) return fprintf(stderr, "usage: forward --replay BW LAT QUEUE\n"), 2;
    sites = 2;
    for (int k = 0; k < sites; k++) slow_site[k] = 1.0;
    for (int a = 0; a < 2; a++) setup(a, 1 - a, atof(argv[2]), atof(argv[3]), 0.0, atof(argv[4]));
    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        line[strcspn(line, "\n")] = 0;
        double now;
        int size;
        if (sscanf(line, "offer %lf %d", &now, &size) == 2) {
            double at = admit(&pipes[0][1], now, size);
            if (at < 0) printf("drop\n"); else printf("%.17g\n", at);
            fflush(stdout);
        } else if (line[0]) {
            answer(line);
        }
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc > 1 && !strcmp(argv[1], "--replay")) return replay(argc, argv);
    if (argc < 8) return fprintf(stderr, "usage: see the head of forward.c\n"), 2;
    int i = 1;
    pid_t owner = (pid_t)atol(argv[i++]);
    rng_state = (uint64_t)strtoull(argv[i++], NULL, 10);
    unsigned char prefix[3];
    for (int j = 0; j < 3; j++) prefix[j] = (unsigned char)atoi(argv[i++]);
    sites = atoi(argv[i++]);
    if (sites < 2 || sites > MAX_SITES || argc < i + sites + 1) return fprintf(stderr, "bad site count\n"), 2;
    int fds[MAX_SITES];
    for (int k = 0; k < sites; k++) fds[k] = atoi(argv[i++]), slow_site[k] = 1.0;
    int links = atoi(argv[i++]);
    if (argc != i + 6 * links) return fprintf(stderr, "expected %d link fields\n", 6 * links), 2;
    for (int l = 0; l < links; l++, i += 6) {
        int a = atoi(argv[i]), b = atoi(argv[i + 1]);
        if (a < 0 || b < 0 || a >= sites || b >= sites || a == b) return fprintf(stderr, "bad link\n"), 2;
        setup(a, b, atof(argv[i + 2]), atof(argv[i + 3]), atof(argv[i + 4]), atof(argv[i + 5]));
    }
    struct sigaction sa = {0};
    sa.sa_handler = on_signal;
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    signal(SIGPIPE, SIG_IGN);
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0); /* wake when a packet is due, not up to 50 us later */

    struct pollfd pfd[MAX_SITES + 1];
    for (int k = 0; k < sites; k++) pfd[k] = (struct pollfd){fds[k], POLLIN, 0};
    pfd[sites] = (struct pollfd){0, POLLIN, 0};
    static unsigned char buf[MAX_PACKET];
    char pending[4096];
    size_t npending = 0;
    double next_owner_check = now_s() + OWNER_POLL_S;
    printf("ready\n");
    fflush(stdout);

    while (!stopping) {
        double now = now_s(), next = INFINITY;
        for (int a = 0; a < sites; a++)
            for (int b = 0; b < sites; b++) {
                pipe_t *p = &pipes[a][b];
                while (p->count && p->ring[p->head].at <= now) {
                    packet_t *q = &p->ring[p->head];
                    if (write(fds[b], q->data, (size_t)q->len) < 0) { /* device down or full: the packet is lost */ }
                    free(q->data);
                    p->head = (p->head + 1) % p->cap, p->count--;
                }
                if (p->count && p->ring[p->head].at < next) next = p->ring[p->head].at;
            }
        if (now >= next_owner_check) {
            if (kill(owner, 0) != 0 && errno == ESRCH) break;
            next_owner_check = now + OWNER_POLL_S;
        }
        double wait = next - now < MAX_WAIT_S ? (next - now > 0.0 ? next - now : 0.0) : MAX_WAIT_S;
        struct timespec ts = {(time_t)wait, (long)((wait - (double)(time_t)wait) * 1e9)};
        int ready = ppoll(pfd, (nfds_t)sites + 1, &ts, NULL);
        if (ready < 0) {
            if (errno == EINTR) continue;
            perror("ppoll");
            break;
        }
        if (pfd[sites].revents) {
            ssize_t r = read(0, pending + npending, sizeof pending - 1 - npending);
            if (r < 0 && errno == EINTR) continue;
            if (r <= 0) break; /* the owner closed its end: stop */
            npending += (size_t)r;
            pending[npending] = 0;
            char *start = pending, *nl;
            while ((nl = strchr(start, '\n'))) {
                *nl = 0;
                if (nl > start) answer(start);
                start = nl + 1;
            }
            npending = strlen(start);
            memmove(pending, start, npending);
            if (npending == sizeof pending - 1) npending = 0; /* a line longer than any command: drop it */
        }
        for (int src = 0; src < sites; src++) {
            if (!(pfd[src].revents & POLLIN)) continue;
            for (int r = 0; r < MAX_READS_PER_WAKE; r++) {
                ssize_t len = read(fds[src], buf, sizeof buf);
                if (len < 0) break;
                /* IPv4 to a site (not IPv6 neighbour discovery, say), and not to itself */
                if (len < 20 || buf[0] >> 4 != 4 || memcmp(buf + 16, prefix, 3)) continue;
                int dst = buf[19] - 1;
                if (dst < 0 || dst >= sites || dst == src) continue;
                pipe_t *p = &pipes[src][dst];
                double at = admit(p, now_s(), (int)len);
                if (at >= 0 && push(p, at, buf, (int)len) != 0) {
                    fprintf(stderr, "out of memory\n");
                    stopping = 1;
                    break;
                }
            }
        }
    }
    printf("{\"router_stats\": {");
    const char *sep = "";
    for (int a = 0; a < sites; a++)
        for (int b = 0; b < sites; b++)
            if (pipes[a][b].used) {
                pipe_t *p = &pipes[a][b];
                printf("%s\"%d->%d\": {\"packets\": %llu, \"bytes\": %llu, \"dropped\": %llu}", sep, a, b,
                       p->packets, p->bytes, p->dropped);
                sep = ", ";
            }
    printf("}}\n");
    fflush(stdout);
    return 0;
}
