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

/* The number of arguments after the first, up to the terminating NULL; 0 when too many. */
static size_t count_args(va_list *ap) {
    size_t count = 1;
    while (va_arg(*ap, const char *) != NULL) {
        if (++count > MAX_ARGS)
            return 0;
    }
    return count;
}

/* argv[0] = first, then the `count - 1` arguments that follow it, then NULL. */
static void fill_argv(const char **argv, size_t count, const char *first, va_list *ap) {
    argv[0] = first;
    for (size_t i = 1; i <= count; i++)
        argv[i] = va_arg(*ap, const char *);
}

/* Declares `argv` (on the stack) from the arguments after `first`, or fails with E2BIG.
   Leaves `ap` just past the terminating NULL (execle's envp comes next). */
#define COLLECT(first, argv, ap)                                                             \
    va_list ap;                                                                              \
    va_start(ap, first);                                                                     \
    size_t count_ = count_args(&ap);                                                         \
    va_end(ap);                                                                              \
    if (count_ == 0) {                                                                       \
        errno = E2BIG;                                                                       \
        return -1;                                                                           \
    }                                                                                        \
    const char *argv[count_ + 1];                                                            \
    va_start(ap, first);                                                                     \
    fill_argv(argv, count_, first, &ap)

int execl(const char *path, const char *arg, ...) {
    COLLECT(arg, argv, ap);
    va_end(ap);
    return execve(path, (char *const *)argv, environ);
}

int execlp(const char *file, const char *arg, ...) {
    COLLECT(arg, argv, ap);
    va_end(ap);
    return execvp(file, (char *const *)argv);
}

/* execle: the environment follows the NULL that ends the arguments. */
int execle(const char *path, const char *arg, ...) {
    COLLECT(arg, argv, ap);
    char *const *envp = va_arg(ap, char *const *);
    va_end(ap);
    return execve(path, (char *const *)argv, envp);
}
