// The C API from C++17: the handles owned by std::unique_ptr, and lambdas as callbacks,
// boxed in std::function and handed over as user_data. The library frees the event
// lambda through user_data_free (once, after its last call) and a completion's box is
// freed by the completion itself (it runs exactly once); when a call fails, nothing was
// taken over and the box is freed here. An exception must not leave a callback.
//
//   raii CLIENT_ACCESS_URL
//
// Joins "raii", sends three messages asynchronously, and exits once their three acks
// and three echoes were seen. Run by scripts/run-examples.sh.
#include "webpubsub_client.h"

#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <functional>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>

namespace {

void check(const char *what, wps_status s) {
    if (s != WPS_STATUS_OK)
        throw std::runtime_error(std::string(what) + ": " + wps_status_str(s) + " (" + wps_last_error_message() + ")");
}

using on_event = std::function<void(const wps_event &)>;
using on_done = std::function<void(const wps_completion &)>;

struct client_free {
    void operator()(wps_client *c) const noexcept { wps_client_free(c); } // waits for the callbacks
};
using client_ptr = std::unique_ptr<wps_client, client_free>;

client_ptr make_client(const char *url, on_event handler) {
    auto box = std::make_unique<on_event>(std::move(handler));
    wps_client *raw = nullptr;
    check("wps_client_new",
          wps_client_new(
              url, nullptr,
              [](void *ud, const wps_event *e) noexcept {
                  try {
                      (*static_cast<on_event *>(ud))(*e);
                  } catch (const std::exception &ex) {
                      std::fprintf(stderr, "event handler: %s\n", ex.what());
                  }
              },
              box.get(), [](void *ud) noexcept { delete static_cast<on_event *>(ud); }, &raw));
    box.release(); // the library owns it now
    return client_ptr(raw);
}

void send_async(wps_client *c, const std::string &group, const std::string &text, on_done done) {
    auto box = std::make_unique<on_done>(std::move(done));
    check("send", wps_client_send_to_group_async(
                      c, group.c_str(), WPS_DATA_TYPE_TEXT, reinterpret_cast<const uint8_t *>(text.data()),
                      text.size(), 0,
                      [](void *ud, const wps_completion *d) noexcept {
                          std::unique_ptr<on_done> once(static_cast<on_done *>(ud));
                          try {
                              (*once)(*d);
                          } catch (...) {
                          }
                      },
                      box.get(), nullptr));
    box.release();
}

} // namespace

int main(int argc, char **argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s CLIENT_ACCESS_URL\n", argv[0]);
        return 2;
    }
    std::mutex mu; // the callbacks run on a library thread
    std::condition_variable cv;
    int acked = 0, echoed = 0;
    try {
        client_ptr client = make_client(argv[1], [&](const wps_event &e) {
            if (e.kind != WPS_EVENT_GROUP_MESSAGE) return;
            std::printf("echo: %.*s\n", static_cast<int>(e.data_len), reinterpret_cast<const char *>(e.data));
            std::lock_guard<std::mutex> lock(mu);
            echoed++;
            cv.notify_all();
        });
        check("start", wps_client_start(client.get()));
        check("join", wps_client_join_group(client.get(), "raii", nullptr));
        for (int i = 0; i < 3; i++)
            send_async(client.get(), "raii", "message " + std::to_string(i), [&](const wps_completion &d) {
                std::lock_guard<std::mutex> lock(mu);
                if (d.status == WPS_STATUS_OK) acked++;
                cv.notify_all();
            });
        std::unique_lock<std::mutex> lock(mu);
        cv.wait_for(lock, std::chrono::seconds(10), [&] { return acked == 3 && echoed == 3; });
        std::printf("acked %d, echoed %d\n", acked, echoed);
    } catch (const std::exception &e) { // the client_ptr freed the client on the way out
        std::fprintf(stderr, "%s\n", e.what());
        return 1;
    }
    return acked == 3 && echoed == 3 ? 0 : 1;
}
