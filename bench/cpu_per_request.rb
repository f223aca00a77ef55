#!/usr/bin/env ruby
# frozen_string_literal: true

# CPU time per request of the proxy process alone (utime + stime from
# /proc/<pid>/stat, Puma excluded), for `thrust` binaries side by side:
# far less noisy than requests/s on a 2-CPU machine. Each binary runs in
# front of its own Puma with the benchmark app; the workloads are wrk runs
# of /hello (uncached, 13 B) and the cached 100 KB asset (gzip), repeated
# REPEAT times with the binaries interleaved.
#
#   bench/cpu_per_request.rb NAME=path/to/thrust[:VAR=VALUE,...] [NAME=... ...]
#   REPEAT=5 DURATION=8 CONNS=64 bench/cpu_per_request.rb before=/tmp/thrust-old after=lib/thruster/thrust
#   bench/cpu_per_request.rb off=lib/thruster/thrust on=lib/thruster/thrust:METRICS_PORT=free
#   WORKLOADS="hello,page gzip,page br" bench/cpu_per_request.rb before=/tmp/thrust-old after=lib/thruster/thrust
#
# Settings after a `:` go to that binary only (`free` = a free port), so one
# binary can be compared with itself under two configurations.
#
# Prints microseconds of proxy CPU per request (median, min–max) per binary
# and workload, and the ratio of each to the first binary.

require "open3"
require "fileutils"
require "tmpdir"
require_relative "support"

REPEAT = Integer(ENV.fetch("REPEAT", "5"))
DURATION = Integer(ENV.fetch("DURATION", "8"))
CONNS = Integer(ENV.fetch("CONNS", "64"))
SERVER_CPU = ENV.fetch("SERVER_CPU", "0")
CLIENT_CPU = ENV.fetch("CLIENT_CPU", "1")
PUMA = Gem.bin_path("puma", "puma")
APP = File.expand_path("app.ru", __dir__)

binaries = ARGV.map do |arg|
  name, spec = arg.split("=", 2)
  path, settings = spec.to_s.split(":", 2)
  [name, path.to_s.empty? ? nil : path, settings.to_s.split(",").to_h { |kv| kv.split("=", 2) }]
end
if binaries.empty? || binaries.any? { |_, p, _| p.nil? }
  abort "usage: #{$PROGRAM_NAME} NAME=path/to/thrust[:VAR=VALUE,...] ..."
end
binaries.each { |name, path, _| abort "#{name}: #{path} is not executable" unless File.executable?(path) }

# The default workloads; WORKLOADS=name,... picks others from ALL_WORKLOADS
# (the page is compressed per request: an encoder's state is allocated and
# freed for each, which is what an allocator change moves).
ALL_WORKLOADS = {
  "hello" => ["/hello", []],
  "cached css gzip" => ["/assets/app.css", ["-H", "Accept-Encoding: gzip"]],
  "page gzip" => ["/page", ["-H", "Accept-Encoding: gzip"]],
  "page br" => ["/page", ["-H", "Accept-Encoding: br"]],
  "page zstd" => ["/page", ["-H", "Accept-Encoding: zstd"]]
}.freeze
WORKLOADS = ALL_WORKLOADS.slice(*ENV.fetch("WORKLOADS", "hello,cached css gzip").split(",")).freeze
abort "WORKLOADS: one or more of #{ALL_WORKLOADS.keys.join(', ')}" if WORKLOADS.empty?

def start(name, path, settings, dir)
  port = BenchSupport.free_port
  target = BenchSupport.free_port
  env = { "HTTP_PORT" => port.to_s, "TARGET_PORT" => target.to_s, "LOG_REQUESTS" => "false",
          "BENCH_BIG" => File.join(dir, "big.bin"), "PUMA_MAX_THREADS" => "8",
          # A disk cache of its own per run: none starts warm from another.
          "STORAGE_PATH" => File.join(dir, "storage-#{name}-#{port}") }
  settings.each { |var, value| env[var] = value == "free" ? BenchSupport.free_port.to_s : value }
  log = File.join(dir, "#{name}.log")
  pid = Process.spawn(env, "taskset", "-c", SERVER_CPU, path, RbConfig.ruby, PUMA, "-t", "8:8", "-q",
                      "-b", "tcp://127.0.0.1:#{target}", APP,
                      out: log, err: log, pgroup: true)
  BenchSupport.wait_for(port, what: name)
  [pid, port]
end

# Requests completed and proxy CPU seconds over one wrk run.
def measure(pid, port, (path, header))
  before = BenchSupport.cpu_seconds([pid])
  out, = Open3.capture2e("taskset", "-c", CLIENT_CPU, "wrk", "-t2", "-c#{CONNS}", "-d#{DURATION}s", *header,
                         "http://127.0.0.1:#{port}#{path}")
  cpu = BenchSupport.cpu_seconds([pid]) - before
  requests = out[/(\d+) requests in/, 1].to_i
  abort "wrk failed:\n#{out}" if requests.zero? || out.include?("Non-2xx")
  [requests, cpu]
end

def report(binaries, samples)
  median = ->(xs) { xs.sort[xs.size / 2] }
  WORKLOADS.each_key do |workload|
    base = median.call(samples[[workload, binaries.first[0]]])
    binaries.each do |name, _|
      xs = samples[[workload, name]]
      puts "#{workload.ljust(16)} #{name.ljust(10)} #{median.call(xs).round(1)} µs/req " \
           "(#{xs.min.round(1)}–#{xs.max.round(1)}) #{(median.call(xs) / base).round(3)}×"
    end
  end
end

Dir.mktmpdir("cpu-per-request") do |dir|
  File.binwrite(File.join(dir, "big.bin"), "x")
  servers = binaries.to_h { |name, path, settings| [name, start(name, path, settings, dir)] }
  # Warm the cache and the upstream pool before measuring.
  servers.each_value do |_, port|
    WORKLOADS.each_value { |(path, _)| Net::HTTP.get(URI("http://127.0.0.1:#{port}#{path}")) }
  end
  samples = Hash.new { |h, k| h[k] = [] }
  REPEAT.times do |rep|
    WORKLOADS.each do |workload, spec|
      servers.each do |name, (pid, port)|
        requests, cpu = measure(pid, port, spec)
        samples[[workload, name]] << (cpu * 1e6 / requests)
        warn "rep #{rep + 1} #{workload.ljust(16)} #{name.ljust(10)} #{requests} req, #{cpu.round(2)} CPU s, " \
             "#{(cpu * 1e6 / requests).round(1)} µs/req"
      end
    end
  end
  report(binaries, samples)
ensure
  servers&.each_value { |pid, _| Process.kill("TERM", -pid) rescue nil } # rubocop:disable Style/RescueModifier
end
