# frozen_string_literal: true

require "net/http"
require "socket"

# Helpers shared by the benchmark scripts: ports and process-tree memory.
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
end
