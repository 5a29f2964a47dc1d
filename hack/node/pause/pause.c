/*
 * The sandbox ("pause") container of every pod: PID 1 of the pod's namespaces.
 *
 * It does what kubernetes' build/pause/linux/pause.c does: sleeps in pause(2) for
 * ever, reaps every child it inherits (SIGCHLD; with a shared PID namespace the
 * pod's orphans re-parent to it), and exits 0 on SIGINT or SIGTERM. `-v` prints the
 * version and exits. Built static (`gcc -static -Os`) by hack/node/images.py into
 * the FROM-scratch image registry.k8s.io/pause:3.10.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef VERSION
#define VERSION "3.10"
#endif

static void on_stop(int signo) {
    static const char msg[] = "pause: shutting down\n";
    (void)signo;
    /* write(2) is async-signal-safe; printf is not. */
    ssize_t ignored = write(STDERR_FILENO, msg, sizeof msg - 1);
    (void)ignored;
    _exit(0);
}

static void on_child(int signo) {
    int saved = errno;
    (void)signo;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static void install(int signo, void (*handler)(int), int flags) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = flags;
    sigemptyset(&action.sa_mask);
    if (sigaction(signo, &action, NULL) < 0) {
        perror("pause: sigaction");
        exit(1);
    }
}

int main(int argc, char **argv) {
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "-v") == 0) {
            printf("pause.c %s\n", VERSION);
            return 0;
        }
    }
    if (getpid() != 1) {
        fprintf(stderr, "pause: warning: not PID 1, orphans of the pod are not reaped here\n");
    }
    install(SIGINT, on_stop, 0);
    install(SIGTERM, on_stop, 0);
    install(SIGCHLD, on_child, SA_NOCLDSTOP | SA_RESTART);
    for (;;) {
        pause();
    }
}
