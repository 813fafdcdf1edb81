/*
 * Single-threaded epoll echo server for the gaspar wire protocol.
 *
 * Listens on 127.0.0.1 at an ephemeral port, prints "PORT <n>" on stdout,
 * then serves until killed. Each connection carries one request: a 4-byte
 * big-endian length and that many payload bytes. The server sends the
 * payload back and closes the connection (FIN). A zero-length request is
 * closed without a reply; a request over MAX_REQUEST_SIZE or a client that
 * closes mid-frame gets a reset (RST), as gaspar does.
 *
 * It does no other work, so its request rate is the most that one core can
 * do for one request per connection on this machine, and the most the load
 * generator has been shown to drive.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_EVENTS 256
#define BACKLOG 1024
/* The same default limit as gaspar's max_request_size (64 MiB). */
#define MAX_REQUEST_SIZE (64u * 1024 * 1024)
/* Payloads up to this size are kept inside the connection record. */
#define INLINE_SIZE 4096

struct connection {
    int fd;
    unsigned char header[4];
    size_t header_received;
    size_t size;
    size_t received;
    size_t sent;
    unsigned char *payload; /* inline_payload or a malloc'd buffer */
    unsigned char inline_payload[INLINE_SIZE];
};

static void close_connection(struct connection *conn, int reset)
{
    if (reset) {
        struct linger linger = {.l_onoff = 1, .l_linger = 0};
        setsockopt(conn->fd, SOL_SOCKET, SO_LINGER, &linger, sizeof linger);
    }
    close(conn->fd);
    if (conn->payload && conn->payload != conn->inline_payload)
        free(conn->payload);
    free(conn);
}

/* Read the request; once complete, send it back. Returns when the socket would block. */
static void service(struct connection *conn)
{
    while (conn->header_received < sizeof conn->header) {
        ssize_t n = recv(conn->fd, conn->header + conn->header_received, sizeof conn->header - conn->header_received, 0);
        if (n > 0) {
            conn->header_received += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n < 0 && errno == EINTR)
            continue;
        close_connection(conn, n != 0 || conn->header_received > 0);
        return;
    }

    if (!conn->payload) {
        uint32_t size_be;
        memcpy(&size_be, conn->header, sizeof size_be);
        conn->size = ntohl(size_be);
        if (conn->size == 0 || conn->size > MAX_REQUEST_SIZE) {
            close_connection(conn, conn->size != 0);
            return;
        }
        conn->payload = conn->size <= INLINE_SIZE ? conn->inline_payload : malloc(conn->size);
        if (!conn->payload) {
            close_connection(conn, 1);
            return;
        }
    }

    while (conn->received < conn->size) {
        ssize_t n = recv(conn->fd, conn->payload + conn->received, conn->size - conn->received, 0);
        if (n > 0) {
            conn->received += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n < 0 && errno == EINTR)
            continue;
        close_connection(conn, 1);
        return;
    }

    while (conn->sent < conn->size) {
        ssize_t n = send(conn->fd, conn->payload + conn->sent, conn->size - conn->sent, MSG_NOSIGNAL);
        if (n > 0) {
            conn->sent += (size_t)n;
            continue;
        }
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        if (n < 0 && errno == EINTR)
            continue;
        close_connection(conn, 1);
        return;
    }
    close_connection(conn, 0);
}

static void accept_all(int listener, int epoll_fd)
{
    for (;;) {
        int fd = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                fprintf(stderr, "echo_server: accept failed: %s\n", strerror(errno));
            return;
        }
        struct connection *conn = calloc(1, sizeof *conn);
        if (!conn) {
            close(fd);
            continue;
        }
        conn->fd = fd;
        struct epoll_event event = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = conn};
        if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &event) != 0) {
            fprintf(stderr, "echo_server: epoll_ctl failed: %s\n", strerror(errno));
            close_connection(conn, 1);
            continue;
        }
        /* The request has often arrived with the handshake. */
        service(conn);
    }
}

int main(void)
{
    signal(SIGPIPE, SIG_IGN);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (listener < 0) {
        perror("echo_server: socket");
        return 1;
    }
    struct sockaddr_in address = {.sin_family = AF_INET, .sin_port = 0};
    address.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t length = sizeof address;
    if (bind(listener, (struct sockaddr *)&address, sizeof address) != 0 || listen(listener, BACKLOG) != 0 ||
        getsockname(listener, (struct sockaddr *)&address, &length) != 0) {
        perror("echo_server: cannot listen on 127.0.0.1");
        return 1;
    }

    int epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    struct epoll_event event = {.events = EPOLLIN, .data.ptr = NULL};
    if (epoll_fd < 0 || epoll_ctl(epoll_fd, EPOLL_CTL_ADD, listener, &event) != 0) {
        perror("echo_server: epoll");
        return 1;
    }
    printf("PORT %d\n", ntohs(address.sin_port));
    fflush(stdout);

    struct epoll_event events[MAX_EVENTS];
    for (;;) {
        int ready = epoll_wait(epoll_fd, events, MAX_EVENTS, -1);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            perror("echo_server: epoll_wait");
            return 1;
        }
        for (int i = 0; i < ready; i++) {
            if (events[i].data.ptr == NULL)
                accept_all(listener, epoll_fd);
            else
                service(events[i].data.ptr);
        }
    }
}
