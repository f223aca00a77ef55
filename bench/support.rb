# frozen_string_literal: true

require "net/http"
require "open3"
require "socket"

# Helpers shared by the benchmark scripts: ports, process-tree memory, wrk.
module BenchSupport
  module_function

  def free_port
    server = TCPServer.new("127.0.0.1", 0)
    server.addr[1]
  ensure
    server&.close
  end

  # Waits until HEAD `path` on the port answers 200 (the server behind it is up).
  def wait_for(port, path: "/hello", timeout: 30, what: "server")
    deadline = Time.now + timeout
    loop do
      begin
        # HEAD: some apps answer every path with a large body.
        return if Net::HTTP.start("127.0.0.1", port, read_timeout: 10) { |http| http.head(path).code == "200" }
      rescue SystemCallError, EOFError, Net::ReadTimeout
        nil
      end
      # Checked after any answer, not only after errors: a proxy answering
      # 502 while its app never comes up must not be waited for forever.
      raise "#{what} did not answer 200 on #{port} within #{timeout} s" if Time.now > deadline

      sleep 0.1
    end
  end

  def children(pid)
    File.read("/proc/#{pid}/task/#{pid}/children").split.map(&:to_i)
  rescue Errno::ENOENT
    []
  end

  def tree(pid) = [pid] + children(pid).flat_map { |c| tree(c) }

  # Sum of one /proc/<pid>/<file> field (KiB) over pids; gone pids count 0.
  def sum_kib(pids, file, field)
    pids.sum do |pid|
      File.read("/proc/#{pid}/#{file}")[/^#{field}:\s+(\d+)/, 1].to_i
    rescue Errno::ENOENT, Errno::ESRCH
      0
    end
  end

  def pss_kib(pids) = sum_kib(pids, "smaps_rollup", "Pss")

  def peak_rss_kib(pids) = sum_kib(pids, "status", "VmHWM")

  # User + system CPU seconds used so far by pids (gone pids count 0).
  def cpu_seconds(pids)
    ticks = pids.sum do |pid|
      File.read("/proc/#{pid}/stat").split(")").last.split.values_at(11, 12).sum(&:to_i)
    rescue Errno::ENOENT, Errno::ESRCH
      0
    end
    ticks / 100.0 # USER_HZ
  end

  # Milliseconds from one of wrk's latency figures ("812.00us", "1.20ms", "2.01s").
  def ms(text)
    value = text.to_f
    return value / 1000 if text.end_with?("us")
    return value * 1000 if text.end_with?("s") && !text.end_with?("ms")

    value
  end

  # One wrk run against url (2 threads, 1 for 1 connection), optionally pinned to `cpu` (a
  # taskset list): req/s, p50/p99 in ms, requests, non-2xx/3xx answers and socket errors.
  def wrk(url, conns:, duration:, headers: {}, cpu: nil)
    args = ["wrk", "-t#{[2, conns].min}", "-c#{conns}", "-d#{duration}s", "--latency"]
    headers.each { |name, value| args += ["-H", "#{name}: #{value}"] }
    args = ["taskset", "-c", cpu, *args] if cpu
    out, = Open3.capture2e(*args, url)
    non2xx = out.scan(/Non-2xx or 3xx responses: (\d+)/).flatten.sum(&:to_i)
    # connect, read, write and timeout (wrk's 2 s): a slow answer, not a wrong one.
    socket_errors = out[/Socket errors: (.*)/, 1].to_s.scan(/\d+/).sum(&:to_i)
    { rps: out[%r{Requests/sec:\s+([\d.]+)}, 1].to_f, p50: ms(out[/^\s+50%\s+(\S+)/, 1].to_s),
      p99: ms(out[/^\s+99%\s+(\S+)/, 1].to_s), requests: out[/(\d+) requests in/, 1].to_i, non2xx:,
      socket_errors:, errors: non2xx + socket_errors }
  end

  # The upper median (of an even count, the higher middle value), nils dropped.
  def median(values) = values.compact.sort[values.compact.size / 2]

  # Waits for a child to exit: true once it has, false after `timeout` s
  # (it is still reaped when it exits later).
  def wait_exit(pid, timeout) = !Process.detach(pid).join(timeout).nil?
end
