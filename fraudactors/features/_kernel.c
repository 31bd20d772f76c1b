/*
 * The per-event loops of the feature definition, compiled. First the user-window block of the feature
 * vector: ``tx_count_10m`` .. ``irregular_merchant_count_6h`` of ``fraudactors.features.definition``
 * for a user with stored events.
 *
 * ``definition.user_features`` calls :func:`user_window` with the user's event columns (the
 * ``UserState`` arrays, as buffers: no Python object per event) and gets the 42 values back as
 * one tuple. The arithmetic is the Python definition's, operation for operation, in the same
 * order: every sum runs left to right from 0 over the same doubles, every ratio of two counts is
 * one IEEE division of exact integers (what Python's int / int rounds to), so the values are bit
 * for bit those of the pure-Python definition (tests/features/reference_features.py, checked by
 * tests/features/test_kernel.py on random histories, and by the committed models, which
 * ``train --synthetic`` reproduces byte for byte). Built with -ffp-contract=off: a fused
 * multiply-add would round differently.
 *
 * Hours outside 0..23 (only a corrupt blob could hold one) are near no hour.
 *
 * Beside it, each held by tests/features/test_kernel.py to the Python it replaced:
 * :func:`merchant_tables` parses a merchant's bucket hashes (HGETALL replies) into the
 * ``MerchantState`` tables for the feature store, what ``int()`` gives for every field without a
 * Python call per field; :func:`window_sums` is a merchant's eight window sums at an event hour
 * (``definition._recompute``); :func:`find_u32` is ``key in column[lo:hi]`` for the seen-sets and
 * the events' merchants without a Python int per item; :func:`counts_tables` and
 * :func:`counts_sums` read a merchant's packed counts (scripts.COUNTS_CODEC) into those tables or
 * straight into the count windows of :func:`window_sums`.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "the merchant counts codec reads little-endian integers with memcpy: a little-endian host is required"
#endif

#define N_OUT 42
#define W_10M 600.0
#define W_1H 3600.0
#define W_6H 21600.0
#define W_24H 86400.0
#define W_7D 604800.0
#define W_30D 2592000.0
#define HOUR_S 3600.0
#define NO_PREVIOUS_TX (-1.0)
#define ZSCORE_MIN_STD 1.0
#define MIN_AVERAGE 0.01
#define HABIT_HOURS 2
#define UNUSUAL_HOUR_SHARE 0.1
#define UNUSUAL_HOUR_MIN_EVENTS 5
#define LAST_N 3
#define REGULAR_USES 2
#define FREQUENT_USES 3
#define STACK_EVENTS 512

/* The first index in [lo, hi) whose value is > x (Python's bisect_right). */
static Py_ssize_t bisect_right(const double *a, double x, Py_ssize_t lo, Py_ssize_t hi) {
    while (lo < hi) {
        Py_ssize_t mid = (lo + hi) / 2;
        if (x < a[mid])
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* amount / base; against one cent when the base is below one cent (definition._ratio). */
static double ratio(double amount, double base) {
    if (base >= MIN_AVERAGE)
        return amount / base;
    return amount == 0.0 ? 1.0 : amount / MIN_AVERAGE;
}

/* Sum of a[lo:hi], left to right from 0 (Python's sum of a list of floats). */
static double sum_range(const double *a, Py_ssize_t lo, Py_ssize_t hi) {
    double s = 0.0;
    for (Py_ssize_t i = lo; i < hi; i++)
        s += a[i];
    return s;
}

/* The events of a 24-bin histogram of hours "near" hour h (circular distance <= HABIT_HOURS). */
static long near_count(const long *hist, long h) {
    if (h < 0 || h >= 24)
        return 0;
    long n = 0;
    for (long d = -HABIT_HOURS; d <= HABIT_HOURS; d++)
        n += hist[((h + d) % 24 + 24) % 24];
    return n;
}

static void histogram(const unsigned char *hours, Py_ssize_t lo, Py_ssize_t hi, long *hist) {
    for (Py_ssize_t i = lo; i < hi; i++)
        if (hours[i] < 24)
            hist[hours[i]]++;
}

/* The value at index k of the values sorted (k < n): Wirth's selection; reorders ``a``. */
static double select_kth(double *a, Py_ssize_t n, Py_ssize_t k) {
    Py_ssize_t l = 0, m = n - 1;
    while (l < m) {
        double x = a[k];
        Py_ssize_t i = l, j = m;
        do {
            while (a[i] < x) i++;
            while (x < a[j]) j--;
            if (i <= j) {
                double tmp = a[i]; a[i] = a[j]; a[j] = tmp;
                i++; j--;
            }
        } while (i <= j);
        if (j < k) l = i;
        if (k < i) m = j;
    }
    return a[k];
}

/* How many of h[lo:hi] equal key, counted up to FREQUENT_USES. */
static int uses(const uint32_t *h, uint32_t key, Py_ssize_t lo, Py_ssize_t hi) {
    int n = 0;
    for (Py_ssize_t j = lo; j < hi; j++) {
        if (h[j] == key && ++n == FREQUENT_USES)
            break;
    }
    return n;
}

static int distinct_u32(const uint32_t *h, Py_ssize_t lo, Py_ssize_t hi) {
    int n = 0;
    for (Py_ssize_t i = lo; i < hi; i++) {
        Py_ssize_t j = lo;
        while (j < i && h[j] != h[i]) j++;
        if (j == i) n++;
    }
    return n;
}

/* A read-only, C-contiguous view of ``obj`` holding ``n`` items of ``itemsize`` bytes. */
static int get_column(PyObject *obj, Py_buffer *view, Py_ssize_t itemsize, Py_ssize_t *n, const char *name) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0)
        return -1;
    if (view->len % itemsize != 0) {
        PyErr_Format(PyExc_ValueError, "%s is not a column of %zd-byte items", name, itemsize);
        PyBuffer_Release(view);
        return -1;
    }
    Py_ssize_t items = view->len / itemsize;
    if (*n < 0) {
        *n = items;
    } else if (items != *n) {
        PyErr_Format(PyExc_ValueError, "%s holds %zd events, times %zd", name, items, *n);
        PyBuffer_Release(view);
        return -1;
    }
    return 0;
}

static PyObject *user_window(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 15) {
        PyErr_Format(PyExc_TypeError, "user_window takes 15 arguments (%zd given)", nargs);
        return NULL;
    }
    static const char *names[6] = {"user_window's times", "user_window's amounts", "user_window's merchant_hashes",
                                   "user_window's hours", "user_window's international", "user_window's new_merchant"};
    static const Py_ssize_t sizes[6] = {8, 8, 4, 1, 1, 1};
    Py_buffer views[6];
    int got = 0;
    Py_ssize_t n = -1;
    PyObject *result = NULL;
    double *scratch = NULL;
    for (; got < 6; got++) {
        if (get_column(args[got], &views[got], sizes[got], &n, names[got]) < 0)
            goto done;
    }
    double t = PyFloat_AsDouble(args[6]);
    double amount = PyFloat_AsDouble(args[7]);
    unsigned long merchant_l = PyLong_AsUnsignedLong(args[8]);
    int x = PyObject_IsTrue(args[9]);
    long hour = PyLong_AsLong(args[10]);
    double novelty[4];
    for (int k = 0; k < 4; k++)
        novelty[k] = PyFloat_AsDouble(args[11 + k]);
    if (PyErr_Occurred() || x < 0)
        goto done;
    if (merchant_l > 0xFFFFFFFFUL) {
        PyErr_SetString(PyExc_OverflowError, "user_window: merchant hash exceeds 32 bits");
        goto done;
    }
    uint32_t merchant = (uint32_t)merchant_l;

    const double *times = (const double *)views[0].buf;
    const double *amounts = (const double *)views[1].buf;
    const uint32_t *hashes = (const uint32_t *)views[2].buf;
    const unsigned char *hours = (const unsigned char *)views[3].buf;
    const unsigned char *intl = (const unsigned char *)views[4].buf;
    const unsigned char *newm = (const unsigned char *)views[5].buf;

    double out[N_OUT];
    int o = 0;
    Py_ssize_t end = bisect_right(times, t, 0, n);
    Py_ssize_t s10m = bisect_right(times, t - W_10M, 0, end);
    Py_ssize_t s1h = bisect_right(times, t - W_1H, 0, end);
    Py_ssize_t s24h = bisect_right(times, t - W_24H, 0, end);
    Py_ssize_t s7d = bisect_right(times, t - W_7D, 0, end);
    Py_ssize_t s30d = bisect_right(times, t - W_30D, 0, end);
    Py_ssize_t n30 = end - s30d;
    double sum30 = sum_range(amounts, s30d, end);
    double sum24 = sum_range(amounts, s24h, end);
    double avg = 0.0, std = 0.0, zscore = 0.0, rat = 1.0;
    if (n30) {
        avg = sum30 / (double)n30;
        double sq = 0.0;
        for (Py_ssize_t i = s30d; i < end; i++)
            sq += amounts[i] * amounts[i];
        double var = sq / (double)n30 - avg * avg;
        std = var > 0.0 ? sqrt(var) : 0.0;
        rat = ratio(amount, avg);
        zscore = (amount - avg) / (std > ZSCORE_MIN_STD ? std : ZSCORE_MIN_STD);
    }
    double since = end ? t - times[end - 1] : NO_PREVIOUS_TX;
    double since2 = end >= 2 ? t - times[end - 2] : NO_PREVIOUS_TX;
    out[o++] = (double)(end - s10m);
    out[o++] = (double)(end - s1h);
    out[o++] = (double)(end - s24h);
    out[o++] = (double)(end - s7d);
    out[o++] = (double)n30;
    out[o++] = sum_range(amounts, s1h, end);
    out[o++] = sum24;
    out[o++] = sum_range(amounts, s7d, end);
    out[o++] = sum30;
    out[o++] = avg;
    out[o++] = std;
    out[o++] = rat;
    out[o++] = zscore;
    out[o++] = since;
    for (int k = 0; k < 4; k++)
        out[o++] = novelty[k];

    if (!n30) {
        /* the habits of a user without earlier events in 30 days, then the sequence */
        static const double no_history[9] = {0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
        for (int k = 0; k < 9; k++)
            out[o++] = no_history[k];
        out[o++] = 0.0;
        out[o++] = 0.0;
        out[o++] = since2;
        out[o++] = 0.0;
        out[o++] = 1.0;
        out[o++] = 0.0;
    } else {
        long ref_hist[24] = {0}, recent_hist[24] = {0}, all_hist[24];
        histogram(hours, s30d, s24h, ref_hist);
        histogram(hours, s24h, end, recent_hist);
        for (int h = 0; h < 24; h++)
            all_hist[h] = ref_hist[h] + recent_hist[h];
        double stack[STACK_EVENTS];
        double *window = stack;
        if (n30 > STACK_EVENTS) {
            window = scratch = PyMem_Malloc((size_t)n30 * sizeof(double));
            if (scratch == NULL) {
                PyErr_NoMemory();
                goto done;
            }
        }
        memcpy(window, amounts + s30d, (size_t)n30 * sizeof(double));
        double median = select_kth(window, n30, n30 / 2);
        Py_ssize_t below = 0;  /* bisect_left of the sorted window: how many are < amount */
        for (Py_ssize_t i = s30d; i < end; i++)
            below += amounts[i] < amount;
        long recent_new = 0;
        double new_amount = 0.0;
        long recent_intl = 0;
        for (Py_ssize_t i = s24h; i < end; i++) {
            recent_new += newm[i];
            if (newm[i])
                new_amount += amounts[i];
            recent_intl += intl[i];
        }
        out[o++] = (double)near_count(all_hist, hour) / (double)n30;
        out[o++] = (double)below / (double)n30;
        out[o++] = ratio(amount, median);
        out[o++] = (double)(end - s24h) / ((double)n30 / 30.0);
        double daily = sum30 / 30.0;  /* 0 for a sum of a few subnormal amounts: no spend to compare */
        out[o++] = daily > 0.0 ? sum24 / daily : 0.0;
        out[o++] = (double)recent_new;
        out[o++] = new_amount;
        out[o++] = (double)distinct_u32(hashes, s24h, end);
        out[o++] = (double)recent_intl;

        /* the sequence; hours judged against the habit before the last 24 h */
        Py_ssize_t s6h = bisect_right(times, t - W_6H, s24h, end);
        Py_ssize_t last = end - LAST_N > s30d ? end - LAST_N : s30d;
        Py_ssize_t n_ref = s24h - s30d;
        double unusual = 0.0, habit_last = 0.0;
        if (n_ref) {
            if (n_ref >= UNUSUAL_HOUR_MIN_EVENTS) {
                double limit = UNUSUAL_HOUR_SHARE * (double)n_ref;
                long count = 0;
                for (Py_ssize_t i = s24h; i < end; i++)
                    count += (double)near_count(ref_hist, hours[i]) < limit;
                unusual = (double)count;
            }
            long near_last = 0;
            for (Py_ssize_t i = last; i < end; i++)
                near_last += near_count(ref_hist, hours[i]);
            habit_last = (double)near_last / (double)n_ref / (double)(end - last);
        }
        long new6 = 0, new_last = 0;
        for (Py_ssize_t i = s6h; i < end; i++)
            new6 += newm[i];
        for (Py_ssize_t i = last; i < end; i++)
            new_last += newm[i];
        double ratios = 0.0;
        for (Py_ssize_t i = last; i < end; i++)
            ratios += ratio(amounts[i], median);
        out[o++] = (double)new6;
        out[o++] = (double)new_last;
        out[o++] = since2;
        out[o++] = unusual;
        out[o++] = ratios / (double)(end - last);
        out[o++] = habit_last;
    }

    /* the cardholder abroad and their regular merchants (definition._abroad_and_regulars) */
    {
        double streak = 0.0, streak_hours = 0.0;
        if (x) {
            Py_ssize_t first = s30d;
            for (Py_ssize_t i = end - 1; i >= s30d; i--) {
                if (intl[i] == 0) {
                    first = i + 1;
                    break;
                }
            }
            streak = (double)(end - first + 1);
            if (first < end)
                streak_hours = (t - times[first]) / HOUR_S;
        }
        long count7 = x;
        Py_ssize_t first7 = -1;
        for (Py_ssize_t i = s7d; i < end; i++) {
            if (intl[i] == 1) {
                count7++;
                if (first7 < 0)
                    first7 = i;
            }
        }
        int u = uses(hashes, merchant, s30d, s24h);
        long irregular = u < REGULAR_USES, irregular6 = irregular, infrequent = u < FREQUENT_USES;
        if (s24h < end) {
            Py_ssize_t s6h = bisect_right(times, t - W_6H, s24h, end);
            for (Py_ssize_t i = s24h; i < end; i++) {
                u = uses(hashes, hashes[i], s30d, s24h);
                if (u < REGULAR_USES) {
                    irregular++;
                    if (i >= s6h)
                        irregular6++;
                }
                if (u < FREQUENT_USES)
                    infrequent++;
            }
        }
        out[o++] = streak;
        out[o++] = streak_hours;
        out[o++] = (double)count7;
        out[o++] = (double)count7 / (double)(end - s7d + 1);
        out[o++] = first7 >= 0 ? (t - times[first7]) / HOUR_S : NO_PREVIOUS_TX;
        out[o++] = (double)irregular;
        out[o++] = (double)infrequent;
        out[o++] = (double)irregular / (double)(end - s24h + 1);
        out[o++] = (double)irregular6;
    }

    result = PyTuple_New(N_OUT);
    if (result == NULL)
        goto done;
    for (int k = 0; k < N_OUT; k++) {
        PyObject *v = PyFloat_FromDouble(out[k]);
        if (v == NULL) {
            Py_CLEAR(result);
            goto done;
        }
        PyTuple_SET_ITEM(result, k, v);
    }

done:
    PyMem_Free(scratch);
    for (int k = 0; k < got; k++)
        PyBuffer_Release(&views[k]);
    return result;
}

/* ---- merchant buckets ------------------------------------------------------------------------ */

/* A canonical decimal ([+-]?[0-9]{1,18}) into *out; 0 when s is anything else. */
static int parse_decimal(const char *s, Py_ssize_t len, long long *out) {
    Py_ssize_t i = 0;
    int negative = 0;
    if (len > 0 && (s[0] == '-' || s[0] == '+')) {
        negative = s[0] == '-';
        i = 1;
    }
    if (len - i < 1 || len - i > 18)
        return 0;
    long long v = 0;
    for (; i < len; i++) {
        if (s[i] < '0' || s[i] > '9')
            return 0;
        v = v * 10 + (s[i] - '0');
    }
    *out = negative ? -v : v;
    return 1;
}

/* Python's int() of s[0:len] (bytes), or NULL with no error set when int() raises ValueError:
 * the canonical form directly, anything else through int() itself. */
static PyObject *as_int(const char *s, Py_ssize_t len) {
    long long v;
    if (parse_decimal(s, len, &v))
        return PyLong_FromLongLong(v);
    PyObject *raw = PyBytes_FromStringAndSize(s, len);
    if (raw == NULL)
        return NULL;
    PyObject *value = PyNumber_Long(raw);
    Py_DECREF(raw);
    if (value == NULL && PyErr_ExceptionMatches(PyExc_ValueError))
        PyErr_Clear();
    return value;
}

static PyObject *merchant_tables(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyList_Check(args[0]) || !PyTuple_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "merchant_tables(flat: list, targets: tuple of dicts)");
        return NULL;
    }
    PyObject *flat = args[0];
    PyObject *targets = args[1];
    Py_ssize_t n_targets = PyTuple_GET_SIZE(targets);
    for (Py_ssize_t k = 0; k < n_targets; k++) {
        if (!PyDict_Check(PyTuple_GET_ITEM(targets, k))) {
            PyErr_SetString(PyExc_TypeError, "merchant_tables: every target must be a dict");
            return NULL;
        }
    }
    Py_ssize_t pairs = PyList_GET_SIZE(flat) / 2;
    for (Py_ssize_t p = 0; p < pairs; p++) {
        PyObject *key = PyList_GET_ITEM(flat, 2 * p);
        PyObject *value = PyList_GET_ITEM(flat, 2 * p + 1);
        if (!PyBytes_Check(key) || !PyBytes_Check(value))
            continue;
        const char *name = PyBytes_AS_STRING(key);
        Py_ssize_t len = PyBytes_GET_SIZE(key);
        /* h<hour> d<day> nh<hour> nd<day> -> kind 0 1 2 3 */
        Py_ssize_t cut = (len >= 1 && name[0] == 'n') ? 2 : 1;
        long kind;
        if (len < cut)
            continue;
        if (cut == 1)
            kind = name[0] == 'h' ? 0 : name[0] == 'd' ? 1 : -1;
        else
            kind = name[1] == 'h' ? 2 : name[1] == 'd' ? 3 : -1;
        if (kind < 0 || kind >= n_targets)
            continue;
        PyObject *bucket = as_int(name + cut, len - cut);
        if (bucket == NULL) {
            if (PyErr_Occurred())
                return NULL;
            continue;
        }
        PyObject *count = as_int(PyBytes_AS_STRING(value), PyBytes_GET_SIZE(value));
        if (count == NULL) {
            Py_DECREF(bucket);
            if (PyErr_Occurred())
                return NULL;
            continue;
        }
        int failed = PyDict_SetItem(PyTuple_GET_ITEM(targets, kind), bucket, count);
        Py_DECREF(bucket);
        Py_DECREF(count);
        if (failed < 0)
            return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- merchant window sums ----------------------------------------------------------------------- */

/* Python's floor division by a positive divisor. */
static long long floor_div(long long a, long long b) {
    long long q = a / b;
    return (a % b != 0 && a < 0) ? q - 1 : q;
}

/* sum(map(table.get, range(lo, hi), repeat(0))) exactly as Python computes it: through the
 * objects, in range order. The fallback of range_sum. */
static PyObject *range_sum_generic(PyObject *table, long long lo, long long hi) {
    PyObject *total = PyLong_FromLong(0);
    for (long long k = lo; total != NULL && k < hi; k++) {
        PyObject *key = PyLong_FromLongLong(k);
        if (key == NULL) {
            Py_CLEAR(total);
            break;
        }
        PyObject *value = PyDict_GetItemWithError(table, key);  /* borrowed */
        Py_DECREF(key);
        if (value == NULL) {
            if (PyErr_Occurred())
                Py_CLEAR(total);
            continue;
        }
        PyObject *sum = PyNumber_Add(total, value);
        Py_DECREF(total);
        total = sum;
    }
    return total;
}

/* The same sum; when every value in range is an int that fits 64 bits and so does the sum, without
 * a Python object per bucket: over the table's items when it has no more of them than the range
 * (a merchant's pruned hashes online), else one lookup per bucket (the unpruned tables offline). */
static PyObject *range_sum(PyObject *table, long long lo, long long hi) {
    if (hi <= lo || PyDict_GET_SIZE(table) == 0)
        return PyLong_FromLong(0);
    long long total = 0;
    int exact = 1;
    if (PyDict_GET_SIZE(table) <= hi - lo) {
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (exact && PyDict_Next(table, &pos, &key, &value)) {
            if (!PyLong_CheckExact(key)) {
                exact = 0;  /* a key of another type: Python's lookups decide what it matches */
                break;
            }
            int overflow;
            long long k = PyLong_AsLongLongAndOverflow(key, &overflow);
            if (overflow || k < lo || k >= hi)
                continue;
            long long v;
            if (!PyLong_CheckExact(value) || (v = PyLong_AsLongLongAndOverflow(value, &overflow), overflow)
                || __builtin_add_overflow(total, v, &total))
                exact = 0;
        }
    } else {
        for (long long k = lo; exact && k < hi; k++) {
            PyObject *key = PyLong_FromLongLong(k);
            if (key == NULL)
                return NULL;
            PyObject *value = PyDict_GetItemWithError(table, key);  /* borrowed */
            Py_DECREF(key);
            if (value == NULL) {
                if (PyErr_Occurred())
                    return NULL;
                continue;
            }
            int overflow;
            long long v;
            if (!PyLong_CheckExact(value) || (v = PyLong_AsLongLongAndOverflow(value, &overflow), overflow)
                || __builtin_add_overflow(total, v, &total))
                exact = 0;
        }
    }
    if (PyErr_Occurred())
        return NULL;
    return exact ? PyLong_FromLongLong(total) : range_sum_generic(table, lo, hi);
}

static PyObject *window_sums(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 7) {
        PyErr_Format(PyExc_TypeError, "window_sums takes 7 arguments (%zd given)", nargs);
        return NULL;
    }
    for (int k = 0; k < 6; k++) {
        if (!PyDict_Check(args[k])) {
            PyErr_SetString(PyExc_TypeError, "window_sums: the six bucket tables must be dicts");
            return NULL;
        }
    }
    long long hour = PyLong_AsLongLong(args[6]);
    if (hour == -1 && PyErr_Occurred())
        return NULL;
    if (hour > (1LL << 40) || hour < -(1LL << 40)) {
        PyErr_SetString(PyExc_OverflowError, "window_sums: hour out of range");
        return NULL;
    }
    long long day = floor_div(hour, 24);
    /* c24, c7, c30 (= c7 + the 23 days before), frauds today before this hour, 7 / 30 past days
     * (30 = 7 + the 23 before), new customers' n24, n30: definition._recompute's windows */
    struct { int table; long long lo, hi; } ranges[8] = {
        {0, hour - 23, hour + 1}, {1, day - 6, day + 1}, {1, day - 29, day - 6}, {4, day * 24, hour},
        {5, day - 7, day}, {5, day - 30, day - 7}, {2, hour - 23, hour + 1}, {3, day - 29, day + 1},
    };
    PyObject *sums[8] = {NULL};
    PyObject *result = NULL;
    for (int r = 0; r < 8; r++) {
        sums[r] = range_sum(args[ranges[r].table], ranges[r].lo, ranges[r].hi);
        if (sums[r] == NULL)
            goto done;
    }
    /* c30 = c7 + older days, f30_past = f7_past + older past days (Python adds them in this order) */
    PyObject *c30 = PyNumber_Add(sums[1], sums[2]);
    if (c30 == NULL)
        goto done;
    Py_SETREF(sums[2], c30);
    PyObject *f30 = PyNumber_Add(sums[4], sums[5]);
    if (f30 == NULL)
        goto done;
    Py_SETREF(sums[5], f30);
    result = PyList_New(8);
    if (result == NULL)
        goto done;
    for (int r = 0; r < 8; r++) {
        PyList_SET_ITEM(result, r, sums[r]);
        sums[r] = NULL;
    }
done:
    for (int r = 0; r < 8; r++)
        Py_XDECREF(sums[r]);
    return result;
}

/* ---- a merchant's packed counts ----------------------------------------------------------------- */

/* The value of a merchant's counts key (scripts.COUNTS_CODEC), version 2: a version byte, then
 * 13-byte entries, little-endian (u8 kind, i32 bucket, i64 count): kind 1 an event hour's
 * transactions, 2 an event day's, 3 and 4 the same of new customers. A bucket may have several
 * entries (the increments appended since the last compaction): its count is their sum. */
#define COUNTS_VERSION 2
#define COUNTS_ENTRY 13

/* The number of entries, or -1 with ValueError set for a string this codec did not write. */
static Py_ssize_t counts_layout(const unsigned char *p, Py_ssize_t len) {
    if (len < 1 || p[0] != COUNTS_VERSION || (len - 1) % COUNTS_ENTRY != 0) {
        PyErr_SetString(PyExc_ValueError, "merchant counts: not a version 2 string of 13-byte entries");
        return -1;
    }
    Py_ssize_t n = (len - 1) / COUNTS_ENTRY;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned char kind = p[1 + i * COUNTS_ENTRY];
        if (kind < 1 || kind > 4) {
            PyErr_Format(PyExc_ValueError, "merchant counts: entry %zd has kind %d", i, (int)kind);
            return -1;
        }
    }
    return n;
}

static void counts_entry(const unsigned char *p, int *kind, long long *bucket, long long *count) {
    int32_t b;
    int64_t c;
    *kind = p[0];
    memcpy(&b, p + 1, 4);  /* little-endian hosts only: the module refuses to build elsewhere */
    memcpy(&c, p + 5, 8);
    *bucket = b;
    *count = c;
}

/* counts_tables(blob, targets): the entries into the dicts ``targets`` (h, d, nh, nd), each
 * bucket's entries summed. */
static PyObject *counts_tables(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0]) || !PyTuple_Check(args[1]) || PyTuple_GET_SIZE(args[1]) != 4) {
        PyErr_SetString(PyExc_TypeError, "counts_tables(blob: bytes, targets: tuple of 4 dicts)");
        return NULL;
    }
    for (int k = 0; k < 4; k++) {
        if (!PyDict_Check(PyTuple_GET_ITEM(args[1], k))) {
            PyErr_SetString(PyExc_TypeError, "counts_tables: every target must be a dict");
            return NULL;
        }
    }
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = counts_layout(p, PyBytes_GET_SIZE(args[0]));
    if (n < 0)
        return NULL;
    for (Py_ssize_t i = 0; i < n; i++) {
        int kind;
        long long bucket, count;
        counts_entry(p + 1 + i * COUNTS_ENTRY, &kind, &bucket, &count);
        PyObject *table = PyTuple_GET_ITEM(args[1], kind - 1);
        PyObject *key = PyLong_FromLongLong(bucket);
        PyObject *value = key == NULL ? NULL : PyLong_FromLongLong(count);
        PyObject *old = value == NULL ? NULL : PyDict_GetItemWithError(table, key);  /* borrowed */
        int failed = value == NULL || (old == NULL && PyErr_Occurred());
        if (!failed && old != NULL) {
            PyObject *sum = PyNumber_Add(old, value);
            Py_SETREF(value, sum);
            failed = value == NULL;
        }
        failed = failed || PyDict_SetItem(table, key, value) < 0;
        Py_XDECREF(key);
        Py_XDECREF(value);
        if (failed)
            return NULL;
    }
    Py_RETURN_NONE;
}

/* counts_sums(blob, hour): [c24, c7, c30, n24, n30] at an event hour, the count windows of
 * definition._recompute (window_sums) straight from the blob. */
static PyObject *counts_sums(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 || !PyBytes_Check(args[0])) {
        PyErr_SetString(PyExc_TypeError, "counts_sums(blob: bytes, hour: int)");
        return NULL;
    }
    long long hour = PyLong_AsLongLong(args[1]);
    if (hour == -1 && PyErr_Occurred())
        return NULL;
    if (hour > (1LL << 40) || hour < -(1LL << 40)) {
        PyErr_SetString(PyExc_OverflowError, "counts_sums: hour out of range");
        return NULL;
    }
    long long day = floor_div(hour, 24);
    const unsigned char *p = (const unsigned char *)PyBytes_AS_STRING(args[0]);
    Py_ssize_t n = counts_layout(p, PyBytes_GET_SIZE(args[0]));
    if (n < 0)
        return NULL;
    /* c24, c7, c30, n24, n30; exact (terms of 64 bits, fewer than 2^60 of them), checked to fit at the end */
    __int128 sums[5] = {0, 0, 0, 0, 0};
    for (Py_ssize_t i = 0; i < n; i++) {
        int kind;
        long long bucket, count;
        counts_entry(p + 1 + i * COUNTS_ENTRY, &kind, &bucket, &count);
        if (kind == 1 || kind == 3) {
            if (bucket >= hour - 23 && bucket <= hour)
                sums[kind == 1 ? 0 : 3] += count;
        } else if (bucket >= day - 29 && bucket <= day) {
            if (kind == 2) {
                sums[2] += count;
                if (bucket >= day - 6)
                    sums[1] += count;
            } else {
                sums[4] += count;
            }
        }
    }
    for (int r = 0; r < 5; r++) {
        if (sums[r] > (__int128)INT64_MAX || sums[r] < (__int128)INT64_MIN) {
            PyErr_SetString(PyExc_ValueError, "merchant counts: a window sum overflows 64 bits");
            return NULL;
        }
    }
    return Py_BuildValue("[LLLLL]", (long long)sums[0], (long long)sums[1], (long long)sums[2], (long long)sums[3],
                         (long long)sums[4]);
}

/* ---- the seen-sets and the events' merchants ---------------------------------------------------- */

/* find_u32(column, key[, lo, hi]): the first i in [lo, hi) (clamped to the column) with
 * column[i] == key, else -1 -- ``key in column[lo:hi]`` without a Python int per item. */
static PyObject *find_u32(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    (void)module;
    if (nargs != 2 && nargs != 4) {
        PyErr_Format(PyExc_TypeError, "find_u32 takes 2 or 4 arguments (%zd given)", nargs);
        return NULL;
    }
    unsigned long key = PyLong_AsUnsignedLong(args[1]);
    if (key == (unsigned long)-1 && PyErr_Occurred()) {
        if (!PyErr_ExceptionMatches(PyExc_OverflowError))
            return NULL;
        PyErr_Clear();  /* a negative or huge int: no uint32 item equals it */
        key = 0x100000000UL;
    }
    Py_ssize_t lo = 0, hi = PY_SSIZE_T_MAX;
    if (nargs == 4) {
        lo = PyLong_AsSsize_t(args[2]);
        hi = PyLong_AsSsize_t(args[3]);
        if (PyErr_Occurred())
            return NULL;
    }
    if (key > 0xFFFFFFFFUL)  /* no uint32 item equals it */
        return PyLong_FromLong(-1);
    Py_buffer view;
    Py_ssize_t n = -1;
    if (get_column(args[0], &view, 4, &n, "find_u32's buffer") < 0)
        return NULL;
    const uint32_t *items = (const uint32_t *)view.buf;
    if (lo < 0) lo = 0;
    if (hi > n) hi = n;
    Py_ssize_t found = -1;
    for (Py_ssize_t i = lo; i < hi; i++) {
        if (items[i] == (uint32_t)key) {
            found = i;
            break;
        }
    }
    PyBuffer_Release(&view);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"user_window", (PyCFunction)(void (*)(void))user_window, METH_FASTCALL,
     "user_window(times, amounts, merchant_hashes, hours, international, new_merchant, t, amount, merchant,\n"
     "            is_international, hour, is_new_merchant, is_new_category, is_new_country, intl_changed)\n"
     "--\n\n"
     "tx_count_10m .. irregular_merchant_count_6h (42 floats) of a user with stored events at time t."},
    {"merchant_tables", (PyCFunction)(void (*)(void))merchant_tables, METH_FASTCALL,
     "merchant_tables(flat, targets)\n--\n\n"
     "Fill the bucket tables ``targets`` (dicts of h, d, nh, nd buckets, in that order; as many as given)\n"
     "from an HGETALL reply ``flat`` (field, value, ...): bucket number -> int(value). Fields of another\n"
     "kind, and names or values int() refuses, are skipped."},
    {"find_u32", (PyCFunction)(void (*)(void))find_u32, METH_FASTCALL,
     "find_u32(column, key, lo=0, hi=len)\n--\n\n"
     "The first index in [lo, hi) of the uint32 column holding key, else -1."},
    {"window_sums", (PyCFunction)(void (*)(void))window_sums, METH_FASTCALL,
     "window_sums(tx_hours, tx_days, new_hours, new_days, fraud_hours, fraud_days, hour)\n--\n\n"
     "A merchant's window sums at an event hour, as definition._recompute caches them:\n"
     "[c24, c7, c30, frauds today, 7 past days, 30 past days, new customers' n24, n30]."},
    {"counts_tables", (PyCFunction)(void (*)(void))counts_tables, METH_FASTCALL,
     "counts_tables(blob, targets)\n--\n\n"
     "Add a merchant's packed counts (scripts.COUNTS_CODEC) into the bucket tables ``targets`` (dicts of\n"
     "h, d, nh, nd buckets), each bucket's entries summed; ValueError for a blob this codec did not write."},
    {"counts_sums", (PyCFunction)(void (*)(void))counts_sums, METH_FASTCALL,
     "counts_sums(blob, hour)\n--\n\n"
     "A merchant's count windows at an event hour from its packed counts: [c24, c7, c30, n24, n30],\n"
     "as window_sums computes them; ValueError for a blob it cannot read or whose sums overflow."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module_def = {
    PyModuleDef_HEAD_INIT, "fraudactors.features._kernel",
    "The per-event loops of the feature definition and the merchant bucket parse, compiled (see _kernel.c).", -1, methods,
    NULL, NULL, NULL, NULL,
};

/* The constants compiled in, for the test that holds them to definition.py's. */
PyMODINIT_FUNC PyInit__kernel(void) {
    PyObject *m = PyModule_Create(&module_def);
    if (m == NULL)
        return NULL;
    PyObject *constants = Py_BuildValue(
        "{s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:d,s:i,s:d,s:i,s:i,s:i,s:i}",
        "W_10M", W_10M, "W_1H", W_1H, "W_6H", W_6H, "W_24H", W_24H, "W_7D", W_7D, "W_30D", W_30D,
        "HOUR_S", HOUR_S, "NO_PREVIOUS_TX", NO_PREVIOUS_TX, "ZSCORE_MIN_STD", ZSCORE_MIN_STD,
        "MIN_AVERAGE", MIN_AVERAGE, "HABIT_HOURS", HABIT_HOURS, "UNUSUAL_HOUR_SHARE", UNUSUAL_HOUR_SHARE,
        "UNUSUAL_HOUR_MIN_EVENTS", UNUSUAL_HOUR_MIN_EVENTS, "LAST_N", LAST_N, "REGULAR_USES", REGULAR_USES,
        "FREQUENT_USES", FREQUENT_USES);
    if (constants == NULL || PyModule_AddObject(m, "CONSTANTS", constants) < 0) {
        Py_XDECREF(constants);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
