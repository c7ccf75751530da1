/*
 * The variadic exec functions, execl, execle and execlp.
 *
 * glibc builds an argv from the arguments and calls its internal execve, which no preload
 * sees, so a glibc program starting a dynamic musl program with execl would hand it our
 * LD_PRELOAD and the musl program would fail to start. Stable Rust cannot define C-variadic
 * functions, hence this file: each collects its arguments into an argv on the stack (no
 * malloc: these may run in a vfork child) and calls execve / execvp, which resolve to the
 * shim's hooks (src/hooks/exec.rs), exported from the same library.
 */
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <unistd.h>

extern char **environ;

/* More arguments than this: E2BIG, as the kernel would answer for a huge argv anyway. */
#define MAX_ARGS 65536

/* Count the arguments after `arg`, up to and including the terminating NULL. */
#define COUNT_ARGS(last, count)                                                              \
    do {                                                                                     \
        va_list ap;                                                                          \
        va_start(ap, last);                                                                  \
        for (count = 1; va_arg(ap, const char *) != NULL; count++) {                         \
            if (count == MAX_ARGS) {                                                         \
                va_end(ap);                                                                  \
                errno = E2BIG;                                                               \
                return -1;                                                                   \
            }                                                                                \
        }                                                                                    \
        va_end(ap);                                                                          \
    } while (0)

int execl(const char *path, const char *arg, ...) {
    size_t count;
    COUNT_ARGS(arg, count);
    const char *argv[count + 1];
    va_list ap;
    va_start(ap, arg);
    argv[0] = arg;
    for (size_t i = 1; i <= count; i++)
        argv[i] = va_arg(ap, const char *);
    va_end(ap);
    return execve(path, (char *const *)argv, environ);
}

int execlp(const char *file, const char *arg, ...) {
    size_t count;
    COUNT_ARGS(arg, count);
    const char *argv[count + 1];
    va_list ap;
    va_start(ap, arg);
    argv[0] = arg;
    for (size_t i = 1; i <= count; i++)
        argv[i] = va_arg(ap, const char *);
    va_end(ap);
    return execvp(file, (char *const *)argv);
}

/* execle: the environment follows the NULL that ends the arguments. */
int execle(const char *path, const char *arg, ...) {
    size_t count;
    COUNT_ARGS(arg, count);
    const char *argv[count + 1];
    va_list ap;
    va_start(ap, arg);
    argv[0] = arg;
    for (size_t i = 1; i <= count; i++)
        argv[i] = va_arg(ap, const char *);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}
