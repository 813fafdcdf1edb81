/*
 * Closed-loop load generator for the gaspar wire protocol.
 *
 * Keeps up to --connections requests in flight, one request per TCP
 * connection: connect, send the frame read from --request, read until the
 * server closes, and compare the reply byte for byte with --expected as it
 * arrives. A finished connection is replaced at once by a new one.
 *
 * The run stops starting requests after --requests requests or --duration
 * seconds, whichever comes first, then waits for those in flight. A request
 * fails after --timeout seconds. Every successful request's latency,
 * from socket() to the server's FIN, is written to --latencies as native
 * uint32 microseconds in completion order. The summary goes to stdout as
 * "key value" lines.
 *
 * --pause-at N (repeatable, ascending) stops starting requests once N have
 * been started, waits for those in flight, prints "checkpoint COMPLETED" and
 * waits for one line on stdin before it goes on, so that the caller can
 * sample the server at an exact request count. Paused time is not counted.
 *
 * Single-threaded, epoll in edge-triggered mode; Linux only.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define MAX_PAUSES 16
#define MAX_EVENTS 512
#define RECV_BUFFER_SIZE (256 * 1024)
/* Maximum epoll_wait timeout, so timeouts and the duration are checked this often. */
#define POLL_INTERVAL_MS 20

enum error_kind { ERR_CONNECT, ERR_RESET, ERR_MISMATCH, ERR_SHORT, ERR_TIMEOUT, ERR_OTHER, ERR_KINDS };
static const char *const error_names[ERR_KINDS] = {
    "errors_connect", "errors_reset", "errors_mismatch", "errors_short", "errors_timeout", "errors_other",
};

struct connection {
    int fd; /* -1 while the slot is free */
    size_t sent;
    size_t received;
    uint64_t started_ns;
};

static struct {
    struct sockaddr_in address;
    unsigned char *request;
    size_t request_size;
    unsigned char *expected;
    size_t expected_size;
    uint64_t timeout_ns;

    int epoll_fd;
    int capacity; /* --connections: the number of slots */
    struct connection *connections;
    int *free_slots;
    int free_count;
    int active;

    uint64_t started;
    uint64_t completed;
    uint64_t errors[ERR_KINDS];
    int reported_other_errno;

    uint32_t *latencies;
    size_t latencies_capacity;
    unsigned char *recv_buffer;
} state;

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
    fprintf(stderr, "loadgen: %s: %s\n", what, strerror(errno));
    exit(2);
}

static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *file = fopen(path, "rb");
    if (!file) {
        fprintf(stderr, "loadgen: cannot open %s: %s\n", path, strerror(errno));
        exit(2);
    }
    struct stat info;
    if (fstat(fileno(file), &info) != 0)
        die("fstat");
    *size = (size_t)info.st_size;
    unsigned char *data = malloc(*size ? *size : 1);
    if (!data)
        die("malloc");
    if (*size && fread(data, 1, *size, file) != *size) {
        fprintf(stderr, "loadgen: short read of %s\n", path);
        exit(2);
    }
    fclose(file);
    return data;
}

static void record_latency(uint64_t latency_ns)
{
    if (state.completed == state.latencies_capacity) {
        state.latencies_capacity = state.latencies_capacity ? state.latencies_capacity * 2 : 65536;
        state.latencies = realloc(state.latencies, state.latencies_capacity * sizeof *state.latencies);
        if (!state.latencies)
            die("realloc");
    }
    uint64_t micros = latency_ns / 1000;
    state.latencies[state.completed] = micros > UINT32_MAX ? UINT32_MAX : (uint32_t)micros;
    state.completed++;
}

static void release(int slot)
{
    struct connection *conn = &state.connections[slot];
    close(conn->fd); /* also removes it from the epoll set */
    conn->fd = -1;
    state.free_slots[state.free_count++] = slot;
    state.active--;
}

static void fail(int slot, enum error_kind kind)
{
    state.errors[kind]++;
    release(slot);
}

static enum error_kind classify(int error)
{
    switch (error) {
    case ECONNREFUSED:
    case EADDRNOTAVAIL:
    case ENETUNREACH:
        return ERR_CONNECT;
    case ECONNRESET:
    case EPIPE:
        return ERR_RESET;
    case ETIMEDOUT:
        return ERR_TIMEOUT;
    default:
        if (!state.reported_other_errno) {
            state.reported_other_errno = 1;
            fprintf(stderr, "loadgen: unexpected socket error: %s\n", strerror(error));
        }
        return ERR_OTHER;
    }
}

/* Send what the socket takes, then read what has arrived; finish the request at EOF. */
static void service(int slot)
{
    struct connection *conn = &state.connections[slot];
    int was_sending = conn->sent < state.request_size;

    while (conn->sent < state.request_size) {
        ssize_t n = send(conn->fd, state.request + conn->sent, state.request_size - conn->sent, MSG_NOSIGNAL);
        if (n > 0) {
            conn->sent += (size_t)n;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            break; /* not connected yet, or the send buffer is full */
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else {
            fail(slot, classify(errno));
            return;
        }
    }

    /* The server replies only after the whole request, so a read right after
     * the last send finds nothing; the reply's arrival raises a new edge. */
    if (was_sending && conn->sent == state.request_size)
        return;

    for (;;) {
        ssize_t n = recv(conn->fd, state.recv_buffer, RECV_BUFFER_SIZE, 0);
        if (n > 0) {
            size_t length = (size_t)n;
            if (conn->received + length > state.expected_size ||
                memcmp(state.recv_buffer, state.expected + conn->received, length) != 0) {
                fail(slot, ERR_MISMATCH);
                return;
            }
            conn->received += length;
        } else if (n == 0) {
            if (conn->sent == state.request_size && conn->received == state.expected_size) {
                record_latency(now_ns() - conn->started_ns);
                release(slot);
            } else {
                fail(slot, ERR_SHORT);
            }
            return;
        } else if (errno == EAGAIN || errno == EWOULDBLOCK) {
            return;
        } else if (errno == EINTR) {
            continue;
        } else {
            fail(slot, classify(errno));
            return;
        }
    }
}

static void launch(void)
{
    int slot = state.free_slots[--state.free_count];
    struct connection *conn = &state.connections[slot];
    conn->sent = 0;
    conn->received = 0;
    conn->started_ns = now_ns();
    state.started++;
    state.active++;

    conn->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (conn->fd < 0) {
        /* Out of descriptors: count it and give the slot back. */
        state.errors[ERR_CONNECT]++;
        conn->fd = -1;
        state.free_slots[state.free_count++] = slot;
        state.active--;
        return;
    }
    if (connect(conn->fd, (struct sockaddr *)&state.address, sizeof state.address) != 0 && errno != EINPROGRESS) {
        fail(slot, ERR_CONNECT);
        return;
    }
    struct epoll_event event = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.u32 = (uint32_t)slot};
    if (epoll_ctl(state.epoll_fd, EPOLL_CTL_ADD, conn->fd, &event) != 0)
        die("epoll_ctl");
    /* On loopback the handshake has usually completed already. */
    service(slot);
}

static void expire(uint64_t now)
{
    for (int slot = 0; slot < state.capacity; slot++) {
        struct connection *conn = &state.connections[slot];
        if (conn->fd >= 0 && now - conn->started_ns > state.timeout_ns)
            fail(slot, ERR_TIMEOUT);
    }
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --port PORT --connections N --requests N --duration SECONDS --timeout SECONDS\n"
            "               --request FILE --expected FILE --latencies FILE [--host IPV4] [--pause-at N]...\n");
    exit(2);
}

int main(int argc, char **argv)
{
    const char *host = "127.0.0.1", *request_path = NULL, *expected_path = NULL, *latencies_path = NULL;
    long port = -1, connections = 0;
    unsigned long long max_requests = 0;
    double duration = 0, timeout = 0;
    uint64_t pauses[MAX_PAUSES];
    int pause_count = 0;

    static const struct option options[] = {
        {"host", required_argument, 0, 'h'},      {"port", required_argument, 0, 'p'},
        {"connections", required_argument, 0, 'c'}, {"requests", required_argument, 0, 'n'},
        {"duration", required_argument, 0, 'd'},  {"timeout", required_argument, 0, 't'},
        {"request", required_argument, 0, 'r'},   {"expected", required_argument, 0, 'e'},
        {"latencies", required_argument, 0, 'l'}, {"pause-at", required_argument, 0, 'P'},
        {0, 0, 0, 0},
    };
    int option;
    while ((option = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (option) {
        case 'h': host = optarg; break;
        case 'p': port = strtol(optarg, NULL, 10); break;
        case 'c': connections = strtol(optarg, NULL, 10); break;
        case 'n': max_requests = strtoull(optarg, NULL, 10); break;
        case 'd': duration = strtod(optarg, NULL); break;
        case 't': timeout = strtod(optarg, NULL); break;
        case 'r': request_path = optarg; break;
        case 'e': expected_path = optarg; break;
        case 'l': latencies_path = optarg; break;
        case 'P':
            if (pause_count == MAX_PAUSES) {
                fprintf(stderr, "loadgen: at most %d --pause-at values\n", MAX_PAUSES);
                return 2;
            }
            pauses[pause_count++] = strtoull(optarg, NULL, 10);
            break;
        default: usage();
        }
    }
    if (port <= 0 || port > 65535 || connections <= 0 || max_requests == 0 || duration <= 0 || timeout <= 0 ||
        !request_path || !expected_path || !latencies_path)
        usage();

    signal(SIGPIPE, SIG_IGN);
    memset(&state.address, 0, sizeof state.address);
    state.address.sin_family = AF_INET;
    state.address.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &state.address.sin_addr) != 1) {
        fprintf(stderr, "loadgen: invalid IPv4 address %s\n", host);
        return 2;
    }
    state.request = read_file(request_path, &state.request_size);
    state.expected = read_file(expected_path, &state.expected_size);
    state.timeout_ns = (uint64_t)(timeout * 1e9);
    state.recv_buffer = malloc(RECV_BUFFER_SIZE);
    state.capacity = (int)connections;
    state.connections = calloc((size_t)connections, sizeof *state.connections);
    state.free_slots = calloc((size_t)connections, sizeof *state.free_slots);
    if (!state.recv_buffer || !state.connections || !state.free_slots)
        die("malloc");
    for (long slot = connections - 1; slot >= 0; slot--) {
        state.connections[slot].fd = -1;
        state.free_slots[state.free_count++] = (int)slot;
    }
    state.epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    if (state.epoll_fd < 0)
        die("epoll_create1");

    struct epoll_event events[MAX_EVENTS];
    uint64_t start = now_ns(), paused_ns = 0, last_expiry_check = start;
    uint64_t duration_ns = (uint64_t)(duration * 1e9);
    int next_pause = 0, stopping = 0;

    for (;;) {
        uint64_t now = now_ns();
        if (now - start - paused_ns >= duration_ns || state.started >= max_requests)
            stopping = 1;
        int pausing = next_pause < pause_count && state.started >= pauses[next_pause];

        while (!stopping && !pausing && state.free_count > 0) {
            launch();
            if (state.started >= max_requests)
                stopping = 1;
            pausing = next_pause < pause_count && state.started >= pauses[next_pause];
        }

        if (state.active == 0) {
            if (stopping)
                break;
            if (pausing) {
                uint64_t pause_start = now_ns();
                printf("checkpoint %llu\n", (unsigned long long)state.completed);
                fflush(stdout);
                char line[64];
                if (!fgets(line, sizeof line, stdin))
                    stopping = 1; /* the caller went away */
                paused_ns += now_ns() - pause_start;
                next_pause++;
                continue;
            }
        }

        int ready = epoll_wait(state.epoll_fd, events, MAX_EVENTS, POLL_INTERVAL_MS);
        if (ready < 0 && errno != EINTR)
            die("epoll_wait");
        for (int i = 0; i < ready; i++) {
            int slot = (int)events[i].data.u32;
            /* An earlier event of this batch may have closed the slot's socket. */
            if (state.connections[slot].fd >= 0)
                service(slot);
        }

        now = now_ns();
        if (now - last_expiry_check >= (uint64_t)POLL_INTERVAL_MS * 1000000u) {
            last_expiry_check = now;
            expire(now);
        }
    }
    uint64_t elapsed_ns = now_ns() - start - paused_ns;

    FILE *out = fopen(latencies_path, "wb");
    if (!out)
        die("cannot open the latencies file");
    if (state.completed && fwrite(state.latencies, sizeof *state.latencies, state.completed, out) != state.completed)
        die("cannot write the latencies file");
    if (fclose(out) != 0)
        die("cannot write the latencies file");

    printf("completed %llu\n", (unsigned long long)state.completed);
    for (int kind = 0; kind < ERR_KINDS; kind++)
        printf("%s %llu\n", error_names[kind], (unsigned long long)state.errors[kind]);
    printf("elapsed_us %llu\n", (unsigned long long)(elapsed_ns / 1000));
    return 0;
}
