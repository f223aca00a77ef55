# frozen_string_literal: true

require "puma/plugin"
require "uri"
require "socket"
require "fileutils"
require_relative "../../thruster"

module Thruster
  # Runs the proxy inside the Puma master: the proxy takes over the
  # addresses Puma would have listened on, and Puma moves to a private Unix
  # socket that only the proxy talks to.
  module PumaIntegration
    DEFAULT_SOCKET = "tmp/sockets/thruster-puma.sock"

    # Puma's binder closes every fd not listed here when it re-execs itself
    # (hot restart); the proxy's handed-over listeners must survive it.
    module KeepHandoffFdsOpen
      def redirects_for_restart
        fds = Thruster.export_handoff(PumaIntegration.handoff)
        super.merge(fds.to_h { |fd| [fd, fd] })
      end
    end

    # Hot restart (USR2, `pumactl restart`, phased restart with preload):
    # `restart` is where Puma starts winding down, before it stops its
    # workers, so the proxy stops accepting there and finishes what is in
    # flight while workers can still answer; `restart!` runs right before
    # the exec, after Puma restored its start-up environment, so the
    # hand-over is exported to ENV there (in `redirects_for_restart`).
    # Puma fires `on_restart` for phased restarts too, where the proxy must
    # keep running, so that event is not used.
    module LauncherHooks
      # Cluster mode's TERM handler calls this first, before stopping the
      # workers: stop accepting there, so no new request is sent to workers
      # that are going away; in-flight ones finish, and `on_stopped` waits.
      def close_binder_listeners
        Thruster.stop_accepting if Thruster.running?
        super
      end

      def restart
        if Thruster.running?
          PumaIntegration.handoff.replace(Thruster.begin_handoff)
          log "* thruster-rs: handing the proxy's listeners over to the restarted process " \
              "(#{PumaIntegration.handoff.join(', ')})"
        end
        super
      end

      def restart!
        Thruster.stop(timeout: 5)
        super
      end
    end

    class << self
      # "fd:addr" of listeners being handed over to the next process image.
      def handoff
        @handoff ||= []
      end

      def start(launcher)
        return stand_aside(launcher) if ENV[Thruster::WRAPPED_ENV]

        options = Thruster.plugin_options.dup
        socket = File.expand_path(options.delete(:puma_socket) || DEFAULT_SOCKET)
        takeover = options.delete(:takeover) != false
        explicit_upstream = options.delete(:upstream)
        cap_upstream(launcher, options) if takeover || !explicit_upstream
        upstream, proxy_binds =
          if takeover
            take_over_binds(launcher, socket, options)
          else
            keep_binds(launcher, explicit_upstream)
          end
        addresses = Thruster.start(upstream:, bind: proxy_binds, **options)
        launcher.events.log "* thruster-rs: proxy on #{addresses.join(', ')} -> #{upstream}"
        hook_lifecycle(launcher)
      end

      # "tcp://host:port" binds as "IP:PORT" strings, hostnames resolved the
      # way Puma resolves them (localhost -> 127.0.0.1 and ::1).
      def tcp_addresses(binds, loopback: false)
        binds.flat_map do |bind|
          uri = URI.parse(bind)
          host = uri.host.to_s.delete_prefix("[").delete_suffix("]")
          host = "127.0.0.1" if loopback && ["0.0.0.0", ""].include?(host)
          host = "::1" if loopback && host == "::"
          Addrinfo.getaddrinfo(host, uri.port, nil, :STREAM).map(&:inspect_sockaddr)
        end.uniq
      end

      private

      # The proxy listens where Puma would have (or on HTTP_PORT when set);
      # Puma moves to a private Unix socket.
      def take_over_binds(launcher, socket, options)
        binds = Array(launcher.options[:binds])
        tcp, other = binds.partition { |b| b.start_with?("tcp://") }
        proxy_binds = http_port_set?(options) ? [] : tcp_addresses(tcp)
        if proxy_binds.empty? && !http_port_set?(options)
          raise ConfigError, "thruster-rs: Puma has no tcp:// bind for the proxy to take over " \
                             "(binds: #{binds.inspect}); set http_port"
        end
        FileUtils.mkdir_p(File.dirname(socket))
        # umask 0177: the socket is 0600, only this user can reach the app.
        launcher.options[:binds] = other + ["unix://#{socket}?umask=0177"]
        ["unix:#{socket}", proxy_binds]
      end

      # `takeover: false`: Puma keeps its binds; the proxy listens on
      # HTTP_PORT and forwards to `upstream:` or Puma's first TCP bind.
      def keep_binds(launcher, upstream)
        tcp = Array(launcher.options[:binds]).select { |b| b.start_with?("tcp://") }
        upstream ||= tcp_addresses(tcp, loopback: true).first
        raise ConfigError, "thruster-rs: takeover: false needs upstream: or a tcp:// bind of Puma's" unless upstream

        [upstream, []]
      end

      def stand_aside(launcher)
        launcher.events.log "* thruster-rs: running under `thrust`, so the plugin stands aside"
      end

      # The app behind the proxy is this Puma (not a server `upstream:`
      # names): unless told otherwise, send it no more requests at once than
      # it has threads, so it never parks connections or closes keep-alive
      # ones.
      def cap_upstream(launcher, options)
        return if setting_set?(options, :upstream_max_connections)

        options[:upstream_max_connections] = puma_capacity(launcher)
        launcher.events.log "* thruster-rs: at most #{options[:upstream_max_connections]} requests " \
                            "at once to Puma (UPSTREAM_MAX_CONNECTIONS)"
      end

      def http_port_set?(options)
        setting_set?(options, :http_port)
      end

      # Given as a keyword or in the environment (THRUSTER_X or X).
      def setting_set?(options, name)
        env = name.to_s.upcase
        options.key?(name) || ["THRUSTER_#{env}", env].any? { |k| !ENV[k].to_s.empty? }
      end

      # Requests Puma serves at once: its threads in each worker (or in
      # itself, single mode).
      def puma_capacity(launcher)
        threads = Integer(launcher.options[:max_threads] || 5)
        workers = Integer(launcher.options[:workers] || 0)
        threads * [workers, 1].max
      end

      # Puma 5/6 name the stop event on_stopped; Puma 7 after_stopped.
      def hook_lifecycle(launcher)
        on(launcher.events, :after_stopped, :on_stopped) { Thruster.stop }
        Puma::Binder.prepend(KeepHandoffFdsOpen) unless Puma::Binder < KeepHandoffFdsOpen
        Puma::Launcher.prepend(LauncherHooks) unless Puma::Launcher < LauncherHooks
      end

      def on(events, *names, &)
        name = names.find { |n| events.respond_to?(n) }
        events.public_send(name, &) if name
      end
    end
  end
end

Puma::Plugin.create do
  def start(launcher)
    Thruster::PumaIntegration.start(launcher)
  end
end

# In config/puma.rb, after `plugin :thruster_rs`:  thruster_rs http_port: 8080
Puma::DSL.class_eval do
  def thruster_rs(**options)
    Thruster.configure(**options)
  end
end
