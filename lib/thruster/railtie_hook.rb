# frozen_string_literal: true

module Thruster
  # Installs Thruster::Railtie in a Rails app, whichever comes first: Rails
  # or this gem. Loadable on its own (no compiled extension, no Rails).
  #
  # When Rails is already loaded (Bundler.require after `require "rails"`),
  # the Railtie is loaded at once. When the gem comes first — the Puma
  # plugin, or `require "thruster-rs"` in config/puma.rb, both run before
  # the app; or `thrust`, which loads this file into the app with RUBYOPT —
  # a TracePoint waits for the app's `class Application < Rails::Application`
  # and loads the Railtie there, before the app is initialized (Rails
  # collects its railties at `initialize!`). Puma's workers inherit the
  # enabled TracePoint when they fork before loading the app. In a process
  # that never defines a Rails application it stays enabled and only looks
  # at each class or module body as it opens. (Ruby 3.1 has no
  # Module#const_added to hook instead.)
  module RailtieHook
    RAILTIE = File.expand_path("railtie", __dir__)

    class << self
      def install
        if defined?(::Rails::Railtie)
          require RAILTIE
        else
          trace.enable unless trace.enabled?
        end
      end

      private

      def trace
        @trace ||= TracePoint.new(:class) do |tp|
          next unless rails_application?(tp.self)

          tp.disable
          require RAILTIE
        end
      end

      def rails_application?(mod)
        defined?(::Rails::Application) && mod.is_a?(Class) && mod < ::Rails::Application
      end
    end
  end
end

Thruster::RailtieHook.install
