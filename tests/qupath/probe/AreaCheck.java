import java.awt.geom.Area;
import java.awt.geom.Path2D;
import java.awt.geom.PathIterator;

/**
 * Does this Java's java.awt.geom.Area keep a many-vertex polygon? (JDK 25.0.3 and 26.0.1 do not: JDK-8386576.)
 *
 * Builds a valid 2,000-vertex star-shaped polygon (a noisy circle), turns it into an Area as QuPath does
 * for a PolygonROI, and checks that the Area's outline is one closed ring of the polygon's area. Prints one line:
 * "java.version=<v> area=ok|bug written=<area> area_outline=<area> parts=<subpaths>". Uses only java.desktop (any Java 17+).
 */
public class AreaCheck {
    public static void main(String[] args) {
        int n = 2000;
        long seed = 12345L;
        Path2D.Double path = new Path2D.Double();
        double[] xs = new double[n];
        double[] ys = new double[n];
        for (int i = 0; i < n; i++) {
            seed = (seed * 6364136223846793005L + 1442695040888963407L);
            double noise = ((seed >>> 11) % 1000) / 1000.0 - 0.5;
            double a = 2 * Math.PI * i / n;
            double r = 2500 * (1 + 0.3 * noise);
            xs[i] = Math.round(15000 + r * Math.cos(a));
            ys[i] = Math.round(5000 + r * Math.sin(a));
            if (i == 0) path.moveTo(xs[i], ys[i]); else path.lineTo(xs[i], ys[i]);
        }
        path.closePath();
        double written = 0;
        for (int i = 0; i < n; i++) {
            int j = (i + 1) % n;
            written += xs[i] * ys[j] - xs[j] * ys[i];
        }
        written = Math.abs(written) / 2;
        double outline = 0;
        int parts = 0;
        double sx = 0, sy = 0, px = 0, py = 0;
        double[] c = new double[6];
        for (PathIterator it = new Area(path).getPathIterator(null); !it.isDone(); it.next()) {
            int type = it.currentSegment(c);
            if (type == PathIterator.SEG_MOVETO) {
                sx = px = c[0]; sy = py = c[1];
                parts++;
            } else if (type == PathIterator.SEG_LINETO) {
                outline += px * c[1] - c[0] * py; px = c[0]; py = c[1];
            } else if (type == PathIterator.SEG_CLOSE) {
                outline += px * sy - sx * py; px = sx; py = sy;
            }
        }
        outline = Math.abs(outline) / 2;
        boolean ok = parts == 1 && Math.abs(outline - written) <= 1e-6 * written;
        System.out.println("java.version=" + System.getProperty("java.version") + " area=" + (ok ? "ok" : "bug")
                + " written=" + written + " area_outline=" + outline + " parts=" + parts);
    }
}
