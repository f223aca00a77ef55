# frozen_string_literal: true

# Soak: MINUTES of mixed load through `thrust` in front of the benchmark app
# (small dynamic responses, a gzip page, a cached CSS asset in gzip and br,
# X-Sendfile downloads, app-streamed downloads through the response buffer,
# uploads), with thrust's RSS sampled every 10 s. A
# leak shows as a rising curve; the report is the curve and its first/last
# minutes. Not part of CI.
#
#   ruby bench/soak.rb                 # 30 minutes
#   MINUTES=5 ruby bench/soak.rb       # writes bench/results/soak.md

require "net/http"
require "fileutils"
require "rbconfig"
require "open3"
require_relative "support"

ROOT = File.expand_path("..", __dir__)
WORK = File.join(ROOT, "tmp", "soak")
THRUST = File.join(ROOT, "lib", "thruster", "thrust")
MINUTES = Float(ENV.fetch("MINUTES", "30"))
SAMPLE_EVERY = 10

abort "bench/soak: #{THRUST} missing; run `bundle exec rake compile`" unless File.executable?(THRUST)
abort "bench/soak: wrk is missing (bin/setup installs it)" unless system("command -v wrk >/dev/null")

FileUtils.mkdir_p(WORK)
# The proxy's disk cache, emptied per run (a warm one would skew the first minutes).
FileUtils.rm_rf(File.join(WORK, "storage"))
BIG = File.join(WORK, "big.bin")
File.open(BIG, "wb") { |f| 8.times { f.write(Random.bytes(1 << 20)) } } unless File.size?(BIG)
UPLOAD = File.join(WORK, "upload.lua")
File.write(UPLOAD, <<~LUA)
  wrk.method = "POST"
  wrk.body = string.rep("x", 200000)
  wrk.headers["Content-Type"] = "application/octet-stream"
LUA

def start
  port = BenchSupport.free_port
  env = { "HTTP_PORT" => port.to_s, "TARGET_PORT" => BenchSupport.free_port.to_s, "LOG_REQUESTS" => "false",
          "BENCH_BIG" => BIG, "X_SENDFILE_ROOTS" => WORK, "RUBYOPT" => nil, "BUNDLE_GEMFILE" => nil,
          "STORAGE_PATH" => File.join(WORK, "storage") }
  pid = Process.spawn(env, THRUST, RbConfig.ruby, Gem.bin_path("puma", "puma"), "-q", "-t", "4:4", "-b",
                      "tcp://127.0.0.1:#{env['TARGET_PORT']}", File.join(ROOT, "bench", "app.ru"),
                      out: File.join(WORK, "thrust.log"), err: File.join(WORK, "thrust.log"), pgroup: true)
  BenchSupport.wait_for(port, what: "thrust (see #{WORK}/thrust.log)")
  [pid, port]
end

# wrk arguments for each kind of request (the URL path last).
KINDS = {
  hello: ["-c32", "/hello"],
  page: ["-c32", "-H", "Accept-Encoding: gzip", "/page"],
  css: ["-c32", "-H", "Accept-Encoding: gzip", "/assets/app.css"],
  css_br: ["-c32", "-H", "Accept-Encoding: br", "/assets/app.css"],
  download: ["-c4", "/download"],
  stream: ["-c4", "/stream"],
  upload: ["-c8", "-s", UPLOAD, "/hello"]
}.freeze

# One 10 s slice of load on one kind of request.
def slice(port, kind)
  *options, path = KINDS.fetch(kind)
  out, = Open3.capture2e("wrk", "-t1", "-d#{SAMPLE_EVERY}s", *options, "http://127.0.0.1:#{port}#{path}")
  out[%r{Requests/sec:\s+([\d.]+)}, 1].to_f
end

pid, port = start
kinds = KINDS.keys
samples = []
finish = Time.now + (MINUTES * 60)
begin
  i = 0
  while Time.now < finish
    kind = kinds[i % kinds.size]
    rps = slice(port, kind)
    rss = BenchSupport.sum_kib([pid], "status", "VmRSS") / 1024.0
    samples << [((i + 1) * SAMPLE_EVERY / 60.0).round(2), kind, rps.round, rss.round(1)]
    warn format("soak: %<min>6.2f min  %<kind>-8s %<rps>7d req/s  RSS %<rss>.1f MiB",
                min: samples.last[0], kind:, rps: samples.last[2], rss: samples.last[3])
    i += 1
  end
ensure
  Process.kill("TERM", -pid)
  Process.wait(pid)
end

per_minute = samples.group_by { |s| s[0].ceil }.map { |m, ss| [m, ss.map(&:last).max] }
first = per_minute.first(3).map(&:last)
last = per_minute.last(3).map(&:last)
report = <<~MD
  Soak #{Time.now.utc.strftime('%Y-%m-%d %H:%M UTC')}: #{MINUTES} min of mixed load through thrust
  (#{kinds.join(', ')}; 10 s each in turn), RSS of thrust sampled every #{SAMPLE_EVERY} s.

  | minute | peak RSS MiB |
  |---|---|
  #{per_minute.map { |m, r| "| #{m} | #{r} |" }.join("\n")}

  First 3 minutes: #{first.join(', ')} MiB; last 3 minutes: #{last.join(', ')} MiB.
MD
FileUtils.mkdir_p(File.join(ROOT, "bench", "results"))
File.write(File.join(ROOT, "bench", "results", "soak.md"), report)
puts report
